"""Per-sample weighting inside each batch, behind one small protocol (``base.Weighter``).

A domain mixer decides how much of each domain a batch holds; a weighter decides how much each
sample of the batch counts in the loss. The trainer multiplies the two (``weighting.name``
and ``mixer.name`` are independent config values). The built-in weighter is the Data
Weighting Model (``dwm``).
"""

from mixlab.weighting.base import (
    WEIGHTERS,
    Weighter,
    WeighterContext,
    WeightingSignals,
    build_weighter,
    register_weighter,
    weighter_class,
)
from mixlab.weighting.bilevel import (
    adam_preconditioner,
    factorised_hypergradient,
    has_dropout,
    lookahead_val_gradient,
    unrolled_hypergradient,
)
from mixlab.weighting.config import DWMConfig, WeightingConfig
from mixlab.weighting.dwm import ANALYSIS_FILE, MODEL_FILE, DataWeighter, load_net, save_net
from mixlab.weighting.model import NetSpec, WeightingNet, batch_weights

__all__ = [
    "ANALYSIS_FILE",
    "MODEL_FILE",
    "WEIGHTERS",
    "DWMConfig",
    "DataWeighter",
    "NetSpec",
    "Weighter",
    "WeighterContext",
    "WeightingConfig",
    "WeightingNet",
    "WeightingSignals",
    "adam_preconditioner",
    "batch_weights",
    "build_weighter",
    "factorised_hypergradient",
    "has_dropout",
    "load_net",
    "lookahead_val_gradient",
    "register_weighter",
    "save_net",
    "unrolled_hypergradient",
    "weighter_class",
]
