"""The weighter protocol, what it is told, and the one registry.

A weighter decides how much each sample of a batch counts in the loss (a mixer decides how
much of each domain the batch holds; the trainer multiplies the two). The session calls, at
every step::

    w = weighter.weights(step, tokens, domains, losses)   # [b] per micro-batch, before backward
    if weighter.trains_at(step):                          # after the LM's backward
        weighter.update(step, signals)                    # e.g. DWM's bi-level step
    weighter.record(step, ...)                            # the step's weights, for its analysis

``[weighting] name`` picks one from the registry (``'none'``: every sample counts the same)
and ``[weighting.options]`` are checked against the weighter's own ``Config`` dataclass, as a
mixer's ``[mixer.options]`` are. Everything a weighter keeps between steps goes through
``state_dict()`` / ``load_state_dict()`` (plain values and tensors, so checkpoints load with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from mixlab.config import from_dict, suggest
from mixlab.errors import ConfigError

if TYPE_CHECKING:
    from mixlab.data.format import DataDir

WeightsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(step, tokens [b, T+1], domains [b], losses [b]) -> weights [b]`` (``Weighter.weights``)."""


@dataclass(frozen=True)
class WeighterContext:
    """What a weighter may know about the run when it is built."""

    domains: list[str]
    """Domain names, in the order of the domain indices of every batch."""
    vocab_size: int
    tokenizer_sha256: str
    """The data dir's tokenizer, for weighters that read tokens and are saved for other runs."""
    total_steps: int
    """Optimizer steps in the whole run."""
    batch_size: int
    """Global batch size in samples (all ranks and accumulation micro-batches together)."""
    seq_len: int
    seed: int
    device: torch.device
    """Where the LM trains (a weighter's network lives there too)."""
    rank: int = 0
    world: int = 1
    data: DataDir | None = None
    """The run's data dir (validation windows); None in unit tests that need none."""
    target_probe: torch.Tensor | None = None
    """[n, T+1] the target set's probe windows, or None when no target is configured."""


class WeightingSignals(Protocol):
    """What the session hands ``Weighter.update`` at a step where the weighter trains."""

    step: int
    tokens: torch.Tensor
    """[b, T+1] this rank's slice of the global batch (CPU)."""
    domains: torch.Tensor
    """[b] their domain indices."""
    losses: torch.Tensor
    """[b] the LM's per-sample losses of this step's forward (detached, CPU)."""
    micro: int
    """Samples per micro-batch: weights are normalised within each one."""
    lr: float
    """The LM's learning rate at this step."""

    def hypergradient(self, val_tokens: torch.Tensor, weights: WeightsFn, *, eta: float,
                      precondition: bool, method: str) -> torch.Tensor:
        """[b] ∂L_val(θ')/∂w_i of this rank's samples: θ' = θ - η P g is the lookahead step of
        the LM along its weighted training gradient g (``.grad``; recomputed in eval mode from
        ``weights`` when the LM has dropout), P AdamW's preconditioner when ``precondition``,
        L_val the mean loss on ``val_tokens`` [v, T+1] (this rank's share), reduced over ranks;
        the mixer's loss factors included. ``method``: the alignment engine's ('fd' or 'jvp').
        See ``mixlab.weighting.bilevel``."""
        ...

    def reduce_grads(self, net: nn.Module) -> None:
        """Sum ``net``'s ``.grad`` over ranks (every rank holds the same small network)."""
        ...


class Weighter:
    """Base class: subclasses define ``Config`` (a dataclass of their options) and ``weights``."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    """Capabilities of the training driver its updates need (``mixlab.train.session.CAPABILITIES``);
    a driver that lacks one refuses the weighter up front (see ``needs_for``)."""
    needs_hint: ClassVar[str] = ""
    """What else the user can do when a driver lacks ``needs`` (added to the refusal)."""

    @dataclass
    class Config:
        pass

    def __init__(self, config: Any, ctx: WeighterContext):
        self.config = config
        self.ctx = ctx

    @classmethod
    def needs_for(cls, config: Any) -> frozenset[str]:
        """The capabilities this configuration needs (``needs`` unless a subclass knows better)."""
        return cls.needs

    def weights(self, step: int, tokens: torch.Tensor, domains: torch.Tensor,
                losses: torch.Tensor) -> torch.Tensor:
        """[b] non-negative loss weights (no graph) of one micro-batch: ``tokens`` [b, T+1],
        ``domains`` [b], ``losses`` [b] the LM's per-sample losses (detached)."""
        raise NotImplementedError

    def trains_at(self, step: int) -> bool:
        """True when ``update`` runs at ``step`` (after the LM's backward, before its step)."""
        return False

    def update(self, step: int, signals: WeightingSignals) -> bool:
        """Train the weighter at ``step``; returns False when the update was skipped."""
        return False

    def record(self, step: int, weights: np.ndarray, domains: np.ndarray, local_tokens: torch.Tensor,
               local_weights: np.ndarray, local_domains: np.ndarray) -> None:
        """The weights [B] and domains [B] of the global batch a step trained with (and this
        rank's tokens [b, T+1], weights [b], domains [b]), for the weighter's analysis."""

    def report(self, step: int) -> dict[str, Any]:
        """Values to log with the step's metrics (JSON-serialisable)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """Values for the run's summary.json (JSON-serialisable)."""
        return {}

    def parameters(self) -> list[torch.Tensor]:
        """Trained state compared across ranks after every update (``train.check_ranks``)."""
        return []

    def save(self, out_dir: Path, decode: Callable[[list[int]], str]) -> None:
        """Write the weighter's files into the run dir at the end (rank 0)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


WEIGHTERS: dict[str, type[Weighter]] = {}


def register_weighter(name: str) -> Callable[[type[Weighter]], type[Weighter]]:
    """Class decorator: make a weighter available as ``[weighting] name``."""

    def deco(cls: type[Weighter]) -> type[Weighter]:
        if name in WEIGHTERS or name == "none":
            raise ValueError(f"weighter '{name}' registered twice (or named 'none')")
        cls.name = name
        WEIGHTERS[name] = cls
        return cls

    return deco


def weighter_class(name: str) -> type[Weighter]:
    import mixlab.weighting.dwm  # noqa: F401 - registers the built-in weighter

    if name not in WEIGHTERS:
        known = ", ".join(["none", *sorted(WEIGHTERS)])
        raise ConfigError(f"weighting.name '{name}' is not a weighter.{suggest(name, WEIGHTERS)} Available: {known}.")
    return WEIGHTERS[name]


def weighter_config(name: str, options: dict[str, Any]) -> Any:
    """``options`` checked against weighter ``name``'s ``Config``: an unknown key is an error
    naming the known ones."""
    cls = weighter_class(name)
    known = [f.name for f in dataclasses.fields(cls.Config) if f.init]
    for key in options:
        if key not in known:
            raise ConfigError(
                f"weighting.options.{key} is not an option of weighter '{name}'.{suggest(key, known)} "
                f"Known options: {', '.join(known)}."
            )
    return from_dict(cls.Config, options, where="weighting.options")


def build_weighter(name: str, options: dict[str, Any], ctx: WeighterContext) -> Weighter:
    """Build weighter ``name`` with ``options`` checked against its ``Config`` dataclass."""
    return weighter_class(name)(weighter_config(name, options), ctx)
