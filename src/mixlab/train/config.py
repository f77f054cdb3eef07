"""The training config: typed dataclasses, one per TOML table, a docstring under every field.

``mixlab train --print-config`` prints this tree with every default and its documentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixlab.config import apply_overrides, from_dict, load_toml
from mixlab.errors import ConfigError
from mixlab.model import ModelConfig
from mixlab.weighting.config import WeightingConfig


@dataclass
class DataConfig:
    dir: str = "data/builtin"
    """Prepared data dir (``mixlab prepare --out``). Relative paths are from the working dir."""
    domains: list[str] = field(default_factory=list)
    """Train on these domains only (in this order); empty = every domain of the data dir."""
    seq_len: int = 128
    """Tokens per training sample (each sample reads seq_len + 1 tokens)."""
    max_epochs: float | dict[str, float] | None = None
    """Repetition budget: train on at most this many passes over a domain's training windows
    (a number for every domain, or a table domain -> number; a domain missing from the table,
    or given 0, has no budget). Unset = no budget. Every mixer's plan is projected onto the
    mixtures that keep each domain within what is left of its budget (mixlab.data.budget);
    a run the budget cannot fill (sum of budgets < steps x batch) is refused before it starts."""
    budget_pace: Literal["greedy", "even"] | None = None
    """With max_epochs: 'greedy' (unset) caps a domain only when this step could pass its
    budget (it is then dropped from the mixture); 'even' caps its share at what is left of its
    budget spread over the remaining steps, so its repetitions are spread over the run."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}.")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"data.domains lists a domain twice: {self.domains}.")
        budgets = (self.max_epochs.items() if isinstance(self.max_epochs, dict)
                   else [("", self.max_epochs)] if self.max_epochs is not None else [])
        for name, e in budgets:
            # `not e >= 0` also refuses NaN.
            if not (math.isfinite(e) and e >= 0):
                key = f"data.max_epochs.{name}" if name else "data.max_epochs"
                raise ConfigError(f"{key} must be a finite number >= 0 (0 = no budget), got {e}.")
        if isinstance(self.max_epochs, dict) and self.domains:
            unknown = [d for d in self.max_epochs if d not in self.domains]
            if unknown:
                raise ConfigError(
                    f"data.max_epochs names {', '.join(map(repr, unknown))}, not in data.domains "
                    f"({', '.join(self.domains)})."
                )
        if self.budget_pace is not None and self.max_epochs is None:
            raise ConfigError("data.budget_pace needs data.max_epochs (the budget it paces).")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to lr * min_lr_ratio at the last step."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr over this many steps."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to biases, norms or embeddings... of rank 1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        # Every range is checked here, NaN included (NaN fails every comparison, so a plain
        # `x <= 0` lets it through), rather than left to torch.optim.AdamW's ValueError.
        def need(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"optim.{name} must be {allowed}, got {getattr(self, name)}.")

        need("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        need("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        need("warmup_steps", self.warmup_steps >= 0, ">= 0")
        need("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             "a finite number >= 0")
        # AdamW's moment decays: beta = 1 never forgets and divides by zero in the bias
        # correction 1 - beta^t, so the range is [0, 1) as in torch.optim.AdamW.
        need("beta1", 0 <= self.beta1 < 1, "in [0, 1) (e.g. 0.9)")
        need("beta2", 0 <= self.beta2 < 1, "in [0, 1) (e.g. 0.95)")
        # eps = 0 makes 0 / (sqrt(0) + 0) = NaN for a parameter whose gradient stays zero.
        need("eps", math.isfinite(self.eps) and self.eps > 0, "a finite number > 0 (e.g. 1e-8)")
        need("grad_clip", math.isfinite(self.grad_clip) and self.grad_clip >= 0,
             "a finite number >= 0 (0 disables clipping)")


@dataclass
class TrainLoopConfig:
    steps: int = 1000
    """Optimizer steps. Every step counts, including steps a mixer uses to probe."""
    batch_size: int = 16
    """Global batch size in samples per optimizer step (all ranks, all micro-batches)."""
    grad_accum: int = 1
    """Split each rank's batch into this many micro-batches (same result, less memory)."""
    seed: int = 0
    """Seeds the model init, the data order, the evaluation subsets and every mixer."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU."""
    threads: int = 0
    """torch threads on CPU; 0 leaves torch's default."""
    log_every: int = 10
    """Write a train line to metrics.jsonl every this many steps."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA) on stderr."""
    max_nonfinite: int = 10
    """Stop (with a checkpoint) after this many consecutive steps with a NaN/inf loss."""
    check_ranks: bool = True
    """Multi-process runs: all-reduce a checksum of the mixture at every step and stop if ranks
    disagree (costs one tiny all-reduce per step)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Multi-process runs: 'ddp' keeps a full copy of the model, gradients and optimizer state on
    every rank; 'fsdp' shards them over the ranks (FSDP2, one unit per transformer block) for
    models that do not fit one device. Checkpoints are the same either way. 'fsdp' refuses the
    mixers that need the whole model on every rank (dga, doge, skillit)."""

    def __post_init__(self) -> None:
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}.")
        if self.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.steps}.")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1.")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}.")


@dataclass
class EvalConfig:
    every: int = 100
    """Evaluate on the validation subset every this many steps (and at the end); 0 = only at the end."""
    windows: int = 64
    """Windows per domain in the fixed, seeded validation subset used for the metrics."""
    signal_windows: int = 16
    """Windows per domain in the (smaller) validation subset that mixers may ask to evaluate."""
    test_windows: int = 256
    """Windows per domain in the fixed test subset evaluated once at the end (summary.json)."""
    batch_size: int = 64
    """Samples per forward pass during evaluation."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}.")
        if min(self.windows, self.signal_windows, self.test_windows, self.batch_size) < 1:
            raise ConfigError("eval.windows, signal_windows, test_windows and batch_size must be >= 1.")


@dataclass
class TargetConfig:
    path: str = ""
    """A small target set: a .txt file (one document), a .jsonl file (field 'text') or a folder of
    them. Empty = no target unless ``domain`` is set."""
    domain: str = ""
    """Hold out the target from this domain's validation documents instead of giving a path."""
    docs: int = 0
    """With ``domain``: how many of its validation documents form the target (0 = all)."""
    probe_fraction: float = 0.5
    """Fraction of the target's documents that mixers may use (the 'probe' part); the rest is only
    ever evaluated, so the reported target loss is on text no method has seen."""

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.domain)

    def __post_init__(self) -> None:
        if self.path and self.domain:
            raise ConfigError("set target.path or target.domain, not both.")
        if not 0 < self.probe_fraction < 1:
            raise ConfigError(f"target.probe_fraction must be in (0, 1), got {self.probe_fraction}.")


@dataclass
class MixerConfig:
    name: str = "stratified"
    """Mixing method, from the registry (``mixlab train --list-mixers``)."""
    apply: Literal["sample", "loss"] = "sample"
    """'sample': draw domains by the mixture. 'loss': draw uniformly and weight each sample's loss
    by w_i / q_i (q = the sampling distribution), for static mixtures."""
    reference: str = ""
    """A finished run dir whose final model is the reference model (DoReMi)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options of the chosen method (see ``mixlab train --print-config --set mixer.name=NAME``)."""

    def __post_init__(self) -> None:
        from mixlab.mixers.base import mixer_class

        # Check the name and the options now, so a typo fails before any data is read.
        cls = mixer_class(self.name)
        from_dict(cls.Config, self.options, where="mixer.options")
        if self.apply == "loss" and cls.dynamic:
            # A dynamic method reads signals as if domains were drawn by its own mixture.
            raise ConfigError(
                f"mixer.apply = 'loss' is for static mixtures; '{self.name}' decides its own "
                "sampling and loss weighting. Remove mixer.apply or pick a static mixer."
            )


@dataclass
class CheckpointConfig:
    every: int = 0
    """Write a checkpoint every this many steps (0 = no step-based checkpoints)."""
    minutes: float = 10.0
    """Also write one when this many minutes of wall time have passed since the last (0 = off),
    so a run killed without warning (SIGKILL, a crash) loses at most about this much."""
    keep: int = 2
    """Keep the last this many checkpoints."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep >= 1.")
        if not (self.minutes >= 0 and self.minutes != float("inf")):
            raise ConfigError(
                f"checkpoint.minutes = {self.minutes} must be a number >= 0 (0 = off)."
            )


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LogConfig:
    """Trackers that mirror the scalars of metrics.jsonl (docs/trackers.md). metrics.jsonl is
    always written; each tracker is an optional extra, checked when training starts."""

    tensorboard: bool = False
    """Also write TensorBoard event files under RUN/tb (needs `pip install 'mixlab[tensorboard]'`)."""
    wandb: bool = False
    """Also log to Weights & Biases, one W&B run per mixlab run, named after the run dir (needs
    `pip install 'mixlab[wandb]'`). Its files go under $WANDB_DIR, else RUN/wandb."""
    wandb_project: str = ""
    """W&B project; empty = $WANDB_PROJECT, else 'mixlab'."""
    wandb_entity: str = ""
    """W&B entity (user or team); empty = $WANDB_ENTITY, else your default entity."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """'online' (needs `wandb login`), 'offline' (files only; upload later with `wandb sync`) or
    'disabled'. Unset = $WANDB_MODE, else 'online', as W&B itself decides."""
    mlflow: bool = False
    """Also log to MLflow, one MLflow run per mixlab run, named after the run dir (needs
    `pip install 'mixlab[mlflow]'`)."""
    mlflow_uri: str = ""
    """MLflow tracking URI (a server 'http://...', or 'sqlite:///path.db'); empty =
    $MLFLOW_TRACKING_URI, else a SQLite store in RUN/mlflow.db."""
    mlflow_experiment: str = ""
    """MLflow experiment (created if missing); empty = $MLFLOW_EXPERIMENT_NAME, else 'mixlab'."""

    def __post_init__(self) -> None:
        # from_dict checks the Literal; a LogConfig built in Python is checked here.
        if self.wandb_mode is not None and self.wandb_mode not in WANDB_MODES:
            raise ConfigError(
                f"log.wandb_mode must be one of {', '.join(map(repr, WANDB_MODES))} or unset, "
                f"got {self.wandb_mode!r}."
            )
        for name in ("wandb_project", "wandb_entity", "mlflow_uri", "mlflow_experiment"):
            value = getattr(self, name)
            if value != value.strip():
                raise ConfigError(f"log.{name} has leading or trailing spaces: {value!r}.")


@dataclass
class TrainConfig:
    """Everything a training run needs. Sections are TOML tables."""

    data: DataConfig = field(default_factory=DataConfig)
    """Which prepared data to train on."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW with warmup and cosine decay."""
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    """The loop: budget, batch, seed, device."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation subsets and schedule."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """An optional small target set (specialisation)."""
    mixer: MixerConfig = field(default_factory=MixerConfig)
    """The domain mixing method."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    log: LogConfig = field(default_factory=LogConfig)
    """Extra logging."""
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    """Per-sample weighting inside each batch (a weighter by name, e.g. the Data Weighting Model); off by default."""

    def __post_init__(self) -> None:
        if self.train.parallel == "fsdp":
            from mixlab.train.fsdp import check_mixer

            check_mixer(self.mixer.name, self.mixer.options)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config (or the defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = load_toml(path) if path else {}
    compare_tables = sorted({"compare", "mixers", "demo"} & set(data))
    if compare_tables:
        raise ConfigError(
            f"'{path}' is a compare config (it has {', '.join(f'[{t}]' for t in compare_tables)}): "
            "run it with `mixlab compare`, or give `mixlab train` a train config such as "
            "configs/small.toml."
        )
    data = apply_overrides(data, overrides or [])
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        if not path:
            raise
        # Name the file the bad value is in (or may be in, when --set overrides were given).
        where = f"config '{path}'" + (" with --set overrides" if overrides else "")
        raise ConfigError(f"{where}: {exc}") from None
