"""The ``[weighting]`` section: which per-sample weighter a run uses, and its options.

``name`` picks a weighter from the registry (``mixlab.weighting.base``); ``[weighting.options]``
are checked against that weighter's own ``Config`` (DWM's: ``DWMConfig``, below)::

    [weighting]
    name = "dwm"

    [weighting.options]
    stages = 5
    use_loss = true
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mixlab.errors import ConfigError


@dataclass
class WeightingConfig:
    name: str = "none"
    """'none': every sample of a batch counts the same. Else a weighter from the registry:
    'dwm', a small Data Weighting Model that weights each sample (w = b · softmax(score / tau),
    mean 1), trained bi-level against the validation (or target) set in stages; works together
    with any mixer."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen weighter, checked against its ``Config`` (for DWM:
    ``DWMConfig``; see ``mixlab train --print-config``)."""

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    def __post_init__(self) -> None:
        if not self.enabled:
            if self.options:
                raise ConfigError(
                    f"weighting.options {sorted(self.options)} are set but weighting.name = 'none': "
                    "set weighting.name (e.g. 'dwm') or remove the options."
                )
            return
        self.weighter_config()  # check the name and the options now, before any data is read

    def weighter_config(self) -> Any:
        """The options as the chosen weighter's validated ``Config``."""
        from mixlab.weighting.base import weighter_config

        return weighter_config(self.name, self.options)

    @staticmethod
    def upgrade_layout(data: dict[str, Any]) -> dict[str, Any]:
        """Read the layout before issue 14, a weighter's options directly under ``[weighting]``
        (``weighting.stages = 5``; every run dir written before then has it in config.toml):
        they move under ``options``. With ``name = 'none'`` the old DWM fields configured
        nothing and are dropped; any other key is left for the unknown-key error."""
        flat = {k: v for k, v in data.items() if k not in ("name", "options")}
        if not flat:
            return data
        name = data.get("name", "none")
        options = data.get("options", {})
        if name == "none":
            inert = {f.name for f in dataclasses.fields(DWMConfig)}
            return {k: v for k, v in data.items() if k not in inert}
        if not isinstance(options, dict):
            return data  # the type error of 'options' says more than a merge would
        for key in flat:
            if key in options:
                raise ConfigError(
                    f"weighting.{key} and weighting.options.{key} are both set; keep "
                    f"weighting.options.{key}."
                )
        return {"name": name, "options": {**flat, **options}}


@dataclass
class DWMConfig:
    """DWM's options, ``[weighting.options]`` when ``[weighting] name = "dwm"``."""

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
    (measured: lr = 0.03 did, +0.74 nats test loss); 0 = no bound."""
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

    def __post_init__(self) -> None:
        o = "weighting.options"
        if self.stages < 1 or self.updates_per_stage < 0:
            raise ConfigError(f"{o}.stages must be >= 1 and {o}.updates_per_stage >= 0.")
        if self.tau <= 0 or self.lr <= 0 or self.lookahead_lr < 0:
            raise ConfigError(f"{o}.tau and {o}.lr must be > 0, {o}.lookahead_lr >= 0.")
        if self.max_weight != 0 and self.max_weight <= 1:
            raise ConfigError(f"{o}.max_weight must be 0 (no bound) or > 1, got {self.max_weight}.")
        if self.val_batch < 0 or self.snippets < 0:
            raise ConfigError(f"{o}.val_batch and {o}.snippets must be >= 0.")
        if self.frozen and not self.load:
            raise ConfigError(
                f"{o}.frozen = true needs {o}.load (a trained weighting model); a new one starts "
                "uniform and would stay uniform."
            )
