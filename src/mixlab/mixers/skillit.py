"""Skill-It (online): sample the domains whose training most helps the domains still lagging.

Chen et al., "Skill-it! A Data-Driven Skills Framework for Understanding and Training Language
Models", NeurIPS 2023 (arXiv 2307.14430); reference code HazyResearch/skill-it
(``trainer/mw_trainer.py``) and its re-implementation in HazyResearch/aioli
(``trainer/skillit_trainer.py``, ``mixing_law_fitting.py skills_graph``, scripts
``scripts/*/skillit``), whose defaults are used here.

**Skills graph.** A[i, j] is the relative drop of domain j's eval loss after training on domain
i alone (the reference ``skills_graph``: (start_loss - end_loss) / start_loss, one row per
single-domain run). The published graphs come from full-length single-domain runs made before
the real run; here they are learned once, online: at ``observe(graph_at_step)`` the trainer
trains one copy of the model per domain for ``graph_steps`` steps
(``signals.branch_eval_deltas(eye(m), graph_steps)``, counted as extra steps) and

    A[i, j] = delta[i, j] / ℓ_j        ℓ = eval losses of the model the branches start from

(an entry whose ℓ_j is not a positive finite number, or whose delta is not finite, is 0).
Until the graph is known the mixture is p0.

**Mixture.** Right after the graph, p ∝ p0 · exp(η A 1) (the reference initialises with a loss
vector of ones). The eval losses are recorded at the graph step and after every step s with
(s + 1) % eval_every == 0; after every step with (s + 1) % update_every == 0

    p ∝ p0 · exp(η A L),    L = Σ of the last ``window`` recorded eval-loss vectors [m]

(A L)_i = Σ_j A_ij L_j: a domain gains weight when it helps domains whose loss is high. The
exponent is taken in log space, so large losses give a peaked but finite p. The update always
multiplies p0 (not the previous p), as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers._util import weights_from_mapping
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, apply_floor, register, softmax

# ---------------------------------------------------------------------------------------------
# Pure update rules.


def skills_graph(deltas: np.ndarray, base_losses: np.ndarray) -> np.ndarray:
    """A [m, m] = deltas[i, j] / base_losses[j]; 0 where that is not a finite number.

    ``deltas`` [m, m]: row i is the drop of every domain's eval loss (before - after) after
    training on domain i alone; ``base_losses`` [m]: the eval losses before.
    """
    deltas = np.asarray(deltas, dtype=np.float64)
    base = np.asarray(base_losses, dtype=np.float64)
    good = np.isfinite(base) & (base > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        A = deltas / np.where(good, base, 1.0)[None, :]
    return np.where(good[None, :] & np.isfinite(A), A, 0.0)


def skillit_update(p0: np.ndarray, A: np.ndarray, losses: np.ndarray, eta: float) -> np.ndarray:
    """p ∝ p0 · exp(η A L) with L [m] the summed eval losses of the window; in log space."""
    drive = np.asarray(A, dtype=np.float64) @ np.asarray(losses, dtype=np.float64)
    # Clipping keeps an overflowed product (inf) from turning the softmax into NaN.
    drive = np.clip(np.nan_to_num(eta * drive, nan=0.0), -1e300, 1e300)
    with np.errstate(divide="ignore"):
        return softmax(np.log(np.asarray(p0, dtype=np.float64)) + drive)


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("skillit")
class SkillIt(Mixer):
    """Skill-It online: multiplicative weights driven by a learned skills graph and eval losses."""

    dynamic = True
    needs = frozenset({"full_model", "branches"})  # branch runs for its graph

    @dataclass
    class Config:
        eta: float = 0.2
        """Step size η of the multiplicative weights (published SlimPajama scripts: 0.2)."""
        window: int = 3
        """Number of most recent eval-loss records summed in the update (published: 3)."""
        update_every: int = 500
        """Steps between mixture updates (published: 500)."""
        eval_every: int = 250
        """Steps between eval-loss records (published: every 5000/20 = 250 steps)."""
        graph_steps: int | None = None
        """Steps of each single-domain branch that measures the skills graph; unset = a tenth of
        the run (the published graphs come from full-length single-domain runs)."""
        graph_at_step: int = 0
        """0-based step after which the graph is learned (branches train at that step's learning
        rate, so a step past the LR warmup measures more)."""
        p0: dict[str, float] = field(default_factory=dict)
        """Prior mixture per domain (any positive scale); empty = uniform (published)."""
        floor: float = 0.0
        """Minimum weight of every domain (mixed with uniform); <= 1/m."""

        def __post_init__(self) -> None:
            if not (np.isfinite(self.eta) and self.eta >= 0):
                raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}.")
            for name in ("window", "update_every", "eval_every"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
            if self.graph_steps is not None and self.graph_steps < 1:
                raise ConfigError(f"graph_steps must be >= 1, got {self.graph_steps}.")
            if self.graph_at_step < 0:
                raise ConfigError(f"graph_at_step must be >= 0, got {self.graph_at_step}.")
            if self.floor < 0:
                raise ConfigError(f"floor must be >= 0, got {self.floor}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m = ctx.m
        if config.floor * m > 1 + 1e-12:
            raise ConfigError(f"floor {config.floor} is above 1/m = {1 / m:.4g}.")
        self.p0 = (
            weights_from_mapping(config.p0, ctx.domains, "mixer.options.p0")
            if config.p0
            else np.full(m, 1.0 / m)
        )
        self.graph_steps = config.graph_steps or max(1, ctx.total_steps // 10)
        self.A: np.ndarray | None = None
        self.p = self.p0.copy()
        self.history: list[np.ndarray] = []
        self.last_record_step = -1

    def plan(self, step: int) -> Plan:
        return Plan(weights=apply_floor(self.p, self.config.floor))

    def observe(self, step: int, signals: Signals) -> None:
        cfg = self.config
        if self.A is None:
            if step < cfg.graph_at_step:
                return
            base = np.asarray(signals.eval_losses(), dtype=np.float64)
            deltas = signals.branch_eval_deltas(np.eye(self.ctx.m), self.graph_steps)
            self.A = skills_graph(deltas, base)
            self._record(step, base)
            self.p = skillit_update(self.p0, self.A, np.ones(self.ctx.m), cfg.eta)
        if (step + 1) % cfg.eval_every == 0 and self.last_record_step != step:
            self._record(step, np.asarray(signals.eval_losses(), dtype=np.float64))
        if (step + 1) % cfg.update_every == 0 and self.history:
            losses = np.sum(self.history[-cfg.window :], axis=0)
            self.p = skillit_update(self.p0, self.A, losses, cfg.eta)

    def _record(self, step: int, losses: np.ndarray) -> None:
        self.last_record_step = step
        if np.all(np.isfinite(losses)):  # a non-finite eval would poison the whole window
            self.history = [*self.history, losses][-self.config.window :]

    def report(self) -> dict[str, Any]:
        return {"p": self.p.tolist(), "A": None if self.A is None else self.A.tolist()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "A": None if self.A is None else self.A.tolist(),
            "p": self.p.tolist(),
            "history": [h.tolist() for h in self.history],
            "last_record_step": self.last_record_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = np.asarray(state["p"], dtype=np.float64)
        if p.shape != (self.ctx.m,):
            raise CheckpointError(f"skillit state has {p.size} domains, this run has {self.ctx.m}.")
        self.p = p
        self.A = None if state["A"] is None else np.asarray(state["A"], dtype=np.float64)
        self.history = [np.asarray(h, dtype=np.float64) for h in state["history"]]
        self.last_record_step = int(state["last_record_step"])
