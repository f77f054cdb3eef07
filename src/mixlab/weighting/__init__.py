"""Per-sample weighting inside each batch: the Data Weighting Model (DWM).

A domain mixer decides how much of each domain a batch holds; a weighter decides how much each
sample of the batch counts in the loss. The trainer multiplies the two (``weighting.name``
and ``mixer.name`` are independent config values).
"""

from mixlab.weighting.bilevel import (
    adam_preconditioner,
    factorised_hypergradient,
    has_dropout,
    lookahead_val_gradient,
    unrolled_hypergradient,
)
from mixlab.weighting.config import WeightingConfig
from mixlab.weighting.dwm import ANALYSIS_FILE, MODEL_FILE, DataWeighter, load_net, save_net
from mixlab.weighting.model import NetSpec, WeightingNet, batch_weights

__all__ = [
    "ANALYSIS_FILE",
    "MODEL_FILE",
    "DataWeighter",
    "NetSpec",
    "WeightingConfig",
    "WeightingNet",
    "adam_preconditioner",
    "batch_weights",
    "factorised_hypergradient",
    "has_dropout",
    "load_net",
    "lookahead_val_gradient",
    "save_net",
    "unrolled_hypergradient",
]
