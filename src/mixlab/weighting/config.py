"""The ``[weighting]`` section: per-sample weighting inside each batch (the Data Weighting Model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mixlab.errors import ConfigError


@dataclass
class WeightingConfig:
    name: Literal["none", "dwm"] = "none"
    """'none': every sample of a batch counts the same. 'dwm': a small Data Weighting Model
    weights each sample (w = b · softmax(score / tau), mean 1), trained bi-level against the
    validation (or target) set in stages; works together with any mixer."""
    stages: int = 5
    """The run is cut into this many equal stages; the weighting model trains at the start of each."""
    updates_per_stage: int = 10
    """Bi-level updates of the weighting model at the first steps of each stage (one per LM step;
    the LM keeps training during them). The weighting model is frozen for the rest of the stage."""
    tau: float = 1.0
    """Softmax temperature of the weights (higher = flatter)."""
    max_weight: float = 0.0
    """Bound every weight by this multiple of the batch mean (> 1; the batch is mixed with uniform
    just enough), so a fast-learning weighting model cannot put the whole batch on a few samples
    (measured: weighting.lr = 0.03 did, +0.74 nats test loss); 0 = no bound."""
    lr: float = 3e-3
    """Learning rate of the weighting model (Adam)."""
    lookahead_lr: float = 0.0
    """Step size eta of the lookahead step theta' = theta - eta * grad; 0 = the LM's current lr."""
    precondition: bool = False
    """Precondition the lookahead step (and the alignments) with AdamW's second moment:
    theta' = theta - eta * grad / (sqrt(v_hat) + eps), AdamW's step along the gradient (v_hat
    bias-corrected, momentum left out), so the lookahead is closer to the LM's real step; a plain
    SGD step before the optimizer's first step. False = a plain SGD lookahead."""
    method: Literal["jvp", "fd"] = "fd"
    """How the alignment engine computes per-sample alignments: 'fd' (two forwards, any attention
    kernel, relative error ~1e-3: small against the noise of a one-batch hypergradient, and
    measured ~12% cheaper per update on CPU) or 'jvp' (exact, math attention)."""
    validation: Literal["auto", "val", "target"] = "auto"
    """Data the weighting model optimises for: 'val' (the validation split, all domains), 'target'
    (the probe part of the target set), 'auto' = target when a target is configured, else val."""
    val_batch: int = 0
    """Validation windows per update; 0 = train.batch_size."""
    d_embed: int = 32
    """Token embedding width of the weighting model."""
    kernel: int = 3
    """Width of its 1-D convolution over tokens (what lets it see local order)."""
    hidden: int = 64
    """Hidden units of its scoring MLP."""
    max_tokens: int = 0
    """Read at most this many leading tokens of each sample; 0 = the whole sample."""
    use_domain: bool = False
    """Also read the sample's domain (ties the model to this run's domains)."""
    use_loss: bool = False
    """Also read the LM's current loss on the sample (standardised within the micro-batch)."""
    use_progress: bool = False
    """Also read the training progress (step / steps)."""
    load: str = ""
    """Start from the weighting model of another run (its run dir, or a dwm.safetensors file),
    e.g. one trained with a smaller LM. Its tokenizer must be this data dir's tokenizer."""
    frozen: bool = False
    """With ``load``: use it as it is, without bi-level updates."""
    snippets: int = 3
    """Highest- and lowest-weighted samples kept per stage for the report."""

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def __post_init__(self) -> None:
        if self.stages < 1 or self.updates_per_stage < 0:
            raise ConfigError("weighting.stages must be >= 1 and weighting.updates_per_stage >= 0.")
        if self.tau <= 0 or self.lr <= 0 or self.lookahead_lr < 0:
            raise ConfigError("weighting.tau and weighting.lr must be > 0, lookahead_lr >= 0.")
        if self.max_weight != 0 and self.max_weight <= 1:
            raise ConfigError(f"weighting.max_weight must be 0 (no bound) or > 1, got {self.max_weight}.")
        if self.val_batch < 0 or self.snippets < 0:
            raise ConfigError("weighting.val_batch and weighting.snippets must be >= 0.")
        if self.frozen and not self.load:
            raise ConfigError(
                "weighting.frozen = true needs weighting.load (a trained weighting model); a new "
                "one starts uniform and would stay uniform."
            )
