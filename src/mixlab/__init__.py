"""mixlab: dynamic data mixing and per-sample data weighting for language-model training."""

from mixlab.errors import MixlabError

__version__ = "0.1.0"
__all__ = ["MixlabError", "__version__"]
