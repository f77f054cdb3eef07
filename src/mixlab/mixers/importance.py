"""Clustered importance sampling (CRISP): sample the generic clusters as the target falls in them.

Grangier et al., "Task-Adaptive Pretrained Language Models via Clustered-Importance Sampling"
(arXiv 2410.03735). The generic data is clustered (``mixlab cluster``: every domain of the data
dir is a cluster) and the few target documents are assigned to the same clusters. The importance
weight of a generic document in cluster c is ``w(c) = P(c | target) / P(c | generic)``; sampling
generic documents with those weights is the same as drawing a cluster from the target's
histogram ``P(c | target)`` and then a document uniformly inside it, which is what the sampler
does when its mixture is that histogram. So this mixer is static (``dynamic = False``) but
target-dependent: its weights are

    p_c = (1 - λ) h_c + λ / m          h = the target's cluster histogram, λ from ``floor``

``h`` comes from ``mixer.options.histogram`` (the target's share per domain) or, when that is
empty, from the trainer (``signals.target_histogram()``: one-hot for a target held out from one
domain; the target's documents assigned to clusters otherwise). The importance ratios w(c) (with
P(c | generic) = the cluster's share of the training tokens) are reported.

The same histogram initialises DGA (``init = "importance"``) and builds its basis distributions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, apply_floor, register

# ---------------------------------------------------------------------------------------------
# Pure helpers.


def histogram_from_mapping(given: Mapping[str, float], domains: Sequence[str], what: str) -> np.ndarray:
    """[m] counts/weights of ``given`` ``{domain: share}`` in the order of ``domains``; a domain
    left out has share 0. Unknown names, negative or non-finite values raise ``ConfigError``."""
    unknown = sorted(set(given) - set(domains))
    if unknown:
        raise ConfigError(f"{what} names unknown domain(s) {unknown}; domains are {list(domains)}.")
    h = np.array([float(given.get(d, 0.0)) for d in domains], dtype=np.float64)
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ConfigError(f"{what} must be finite and >= 0, got {dict(zip(domains, h.tolist()))}.")
    return h


def importance_weights(histogram: np.ndarray, train_tokens: np.ndarray, domains: Sequence[str]) -> np.ndarray:
    """The target's cluster histogram as a sampling distribution [m] (``histogram`` / its sum).

    Raises ``ConfigError`` for an empty histogram (no target document in any cluster) and for a
    histogram that puts mass on a cluster with no training tokens (nothing to sample there).
    """
    h = np.asarray(histogram, dtype=np.float64)
    if h.shape != (len(domains),):
        raise ConfigError(f"the target histogram has {h.size} entries for {len(domains)} domains.")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ConfigError(f"the target histogram must be finite and >= 0, got {h.tolist()}.")
    if h.sum() <= 0:
        raise ConfigError(
            "the target histogram is empty: no target document falls in any cluster; check the "
            "target set (target.path / target.domain) or mixer.options.histogram."
        )
    empty = [d for d, n, x in zip(domains, train_tokens, h) if x > 0 and n <= 0]
    if empty:
        raise ConfigError(
            f"the target falls in cluster(s) {empty}, which hold no training documents; "
            "re-cluster the data or drop those clusters from the histogram."
        )
    return h / h.sum()


def importance_ratios(weights: np.ndarray, train_tokens: np.ndarray) -> np.ndarray:
    """[m] CRISP's w(c) = P(c | target) / P(c | generic), P(c | generic) = token share; 0 for a
    cluster without tokens."""
    n = np.asarray(train_tokens, dtype=np.float64)
    generic = n / n.sum() if n.sum() > 0 else np.zeros_like(n)
    out = np.zeros_like(generic)
    np.divide(weights, generic, out=out, where=generic > 0)
    return out


def resolve_histogram(
    option: Mapping[str, float], ctx: MixerContext, signals: Signals | None, what: str
) -> np.ndarray:
    """The target's cluster histogram as a distribution [m]: from the option when it is given,
    else from ``signals.target_histogram()``."""
    if option:
        h = histogram_from_mapping(option, ctx.domains, what)
    elif signals is None:
        raise ConfigError(f"{what} is empty and no target is available to compute it.")
    else:
        h = np.asarray(signals.target_histogram(), dtype=np.float64)
    return importance_weights(h, ctx.train_tokens, ctx.domains)


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("importance")
class Importance(Mixer):
    """Clustered importance sampling: the mixture is the target's cluster histogram."""

    dynamic = False

    @dataclass
    class Config:
        histogram: dict[str, float] = field(default_factory=dict)
        """The target's share of each domain (cluster), any positive scale, e.g. {c3 = 5, c7 = 1};
        domains left out get 0. Empty = computed from the configured target set."""
        floor: float = 0.0
        """Mix with uniform so every domain has at least this weight (0 = pure CRISP; at most
        1/m). Keeps clusters the few target documents miss from vanishing."""

        def __post_init__(self) -> None:
            if not (np.isfinite(self.floor) and self.floor >= 0):
                raise ConfigError(f"floor must be a finite number >= 0, got {self.floor}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        if config.floor * ctx.m > 1 + 1e-12:
            raise ConfigError(f"floor {config.floor} is above 1/m = {1 / ctx.m:.4g}.")
        self.weights: np.ndarray | None = None
        if config.histogram:
            self.weights = self._finish(resolve_histogram(config.histogram, ctx, None, self._what))

    _what = "mixer.options.histogram"

    def _finish(self, h: np.ndarray) -> np.ndarray:
        return apply_floor(h, self.config.floor)

    def start(self, signals: Signals) -> None:
        if self.weights is None:
            self.weights = self._finish(resolve_histogram({}, self.ctx, signals, self._what))

    def plan(self, step: int) -> Plan:
        if self.weights is None:
            raise ConfigError(
                "importance sampling has no target histogram yet (start() was not called); give "
                "mixer.options.histogram or train with a target set."
            )
        return Plan(weights=self.weights.copy())

    def report(self) -> dict[str, Any]:
        if self.weights is None:
            return {}
        return {"importance_ratio": importance_ratios(self.weights, self.ctx.train_tokens).tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state.get("weights")
        if w is not None and len(w) != self.ctx.m:
            raise CheckpointError(f"importance state has {len(w)} domains, this run has {self.ctx.m}.")
        self.weights = None if w is None else np.asarray(w, dtype=np.float64)
