"""Aioli: estimate the linear dynamic mixing law online and follow it by exponentiated gradient.

Chen, Hu, Lourie, Cho, Ré, "Aioli: A unified optimization framework for language model data
mixing", ICLR 2025 (arXiv 2411.05735); reference code HazyResearch/aioli.

The law (the paper's LMO framework): after one step on mixture p, the eval loss of domain i
drops by (A p)_i, i.e. L_i^{t+1} = L_i^t - sum_j A_ij p_j. The greedy step that lowers the
average loss most is exponentiated gradient, p_j ∝ p_j exp(eta sum_i A_ij). Aioli measures A
during training, in rounds of U = ``round_steps`` steps (0-based step numbers, every step is a
real optimizer step that the trainer counts and schedules the learning rate for)::

    [0, prior_steps)                 train on the prior p0 (restricted setting; phase "prior")
    then, for round r = 0, 1, ...:
      Lp = lp_rounds * m * lp_steps  LearnParams: probes in random order, phase "probe"
      U - Lp                         train on p, updated from this round's A

LearnParams runs ``lp_rounds`` random permutations of the m probes; probe j trains ``lp_steps``
steps on P_j = c e_j + (1 - c)/(m - 1) (1 - e_j) (c = ``one_hot_factor``). Its batches have the
exact composition ``closest_counts(P_j, batch)``, so the mixture trained is the realised R_j =
counts / batch, not P_j (the published code probes with m=7, batch 8 batches that hold 0.545 of
the probed group and none of another). The drop of every domain's mixer-eval loss across probe j
(eval at the step before it starts and at its last step) gives column j of B (averaged over the
``lp_rounds`` repeats); the law says B = A R^T, so A = B R^{-T} is solved with the realised R.

Update after the probes of a round (the published scripts' path, ``--aioli_normalize_A --ema``):
A is shifted to be >= 0 and divided by its sum (``normalize``), smoothed across rounds,
Ā_r = (1 - ema) A_r + ema Ā_{r-1} (``ema`` is the weight on the old value), and

    anchor = "initial":  p_r ∝ p0 ⊙ exp(eta Σ_i Ā_r[i, :])      (published code with --ema)
    anchor = "previous": p_r ∝ p_{r-1} ⊙ exp(eta Σ_i Ā_r[i, :])  (the paper's EG step; the
                                                                   published code without --ema)

The default is "initial": every published script sets ``--ema``, and then the code multiplies
the fixed initial vector, not the previous p; the EMA already carries the history, so
multiplying the previous p as well would count each round's A again in every later round. A
consequence worth knowing: with a normalised A (entries sum to 1) the column sums lie in [0, 1],
so p stays within a factor exp(eta) of p0. In the restricted setting p0 is the prior; the
published code instead forgets the prior after ``prior_steps`` and restarts from uniform — we
keep it as the anchor, which is what "Aioli adjusts the prior" means.

Robustness: a step with a non-finite loss is not observed by the trainer; a probe whose before
or after eval is missing (or non-finite) is left out of B; a round whose B misses a probe, or
whose A is not finite, keeps the previous p (counted in ``report()["rounds_skipped"]``). The
first probe's "before" eval comes from ``start()`` (the initial model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mixlab.data.sampler import closest_counts
from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers._util import run_final_weights, weights_from_mapping
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, apply_floor, register, softmax

# Salt of the probe-order stream, so it never coincides with another stream seeded by `seed`.
_ORDER_SALT = 0xA10E1


# ---------------------------------------------------------------------------------------------
# Pure update rules.


def probe_mixture(m: int, j: int, c: float) -> np.ndarray:
    """[m] probe j: c on domain j, (1 - c)/(m - 1) on every other domain."""
    p = np.full(m, (1.0 - c) / (m - 1))
    p[j] = c
    return p


def probe_order(seed: int, round_index: int, m: int, lp_rounds: int) -> np.ndarray:
    """[lp_rounds * m] probe indices of one round: ``lp_rounds`` independent permutations of m.

    Seeded by (seed, round), so the order is a pure function of the step and needs no state.
    """
    rng = np.random.default_rng([seed % 2**32, _ORDER_SALT, round_index])
    return np.concatenate([rng.permutation(m) for _ in range(lp_rounds)])


def solve_A(P_realised: np.ndarray, B: np.ndarray) -> np.ndarray:
    """The mixing-law matrix A [m, m] with B = A P_realised^T.

    ``P_realised`` [k, m]: row j is the mixture actually trained by probe j. ``B`` [m, k]:
    B[i, j] is the drop of domain i's loss across probe j. Exact solve when P is square and of
    full rank, least squares (minimum norm) otherwise.
    """
    P = np.asarray(P_realised, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if P.shape[0] == P.shape[1] and np.linalg.matrix_rank(P) == P.shape[0]:
        return np.linalg.solve(P, B.T).T
    return np.linalg.lstsq(P, B.T, rcond=None)[0].T


def normalize_A(A: np.ndarray) -> np.ndarray:
    """Shift A so its minimum is >= 0, then divide by its sum.

    All zeros when the shifted sum is 0 (every entry equal); all NaN when it is not finite, so
    that the caller skips the update instead of dividing by infinity.
    """
    A = np.asarray(A, dtype=np.float64)
    shifted = A - min(float(A.min()), 0.0)
    total = shifted.sum()
    if not np.isfinite(total) or total <= 0:
        return np.zeros_like(A) if np.isfinite(total) else np.full_like(A, np.nan)
    return shifted / total


def ema_update(previous: np.ndarray | None, new: np.ndarray, ema: float) -> np.ndarray:
    """(1 - ema) * new + ema * previous; ``new`` itself when there is no previous value."""
    if previous is None:
        return np.array(new, dtype=np.float64)
    return (1.0 - ema) * np.asarray(new) + ema * np.asarray(previous)


def aioli_update(p: np.ndarray, A: np.ndarray, eta: float) -> np.ndarray:
    """Exponentiated-gradient step p_j ∝ p_j exp(eta Σ_i A_ij), computed in log space.

    Domains with p_j = 0 stay at 0 (the log of 0 is -inf, which the softmax maps back to 0).
    """
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(p, dtype=np.float64)) + eta * np.asarray(A).sum(axis=0)
    return softmax(logits)


# ---------------------------------------------------------------------------------------------
# The mixer.


@register("aioli")
class Aioli(Mixer):
    """Aioli: LearnParams probes every round, then train on the exponentiated-gradient mixture."""

    dynamic = True

    @dataclass
    class Config:
        round_steps: int = 250
        """U: steps per round (probes included). Published: 250 (arxiv/stackexchange and
        arxiv/books/stackexchange scripts), 200 (full SlimPajama)."""
        lp_rounds: int = 4
        """Sweeps over the m probes per round (published two/three-group scripts: 4; full: 2)."""
        lp_steps: int = 4
        """Steps per probe (published: 4 two groups, 6 three groups, 10 full)."""
        one_hot_factor: float = 0.625
        """c: share of the probed domain in its probe batches, the rest split evenly; must be
        above 1/m (published: 0.625 two groups, 0.5 three groups, 0.75 full)."""
        eta: float = 0.2
        """Step size of the exponentiated-gradient update (published: 0.2 two groups, 0.1 three,
        1 full)."""
        ema: float = 0.1
        """Weight of the previous round's A in its moving average; 0 disables smoothing
        (published: 0.1, 0.5 for three groups)."""
        normalize: bool = True
        """Shift A to be >= 0 and divide by its sum before the update (published scripts
        always set --aioli_normalize_A)."""
        anchor: Literal["initial", "previous"] = "initial"
        """What the update multiplies: 'initial' p0 (published code with an EMA) or 'previous'
        p (the paper's exponentiated-gradient step); see the module docstring."""
        prior: dict[str, float] = field(default_factory=dict)
        """Restricted setting: p0 given per domain (any positive scale); empty = uniform."""
        prior_run: str | None = None
        """Restricted setting: p0 = ``weights_final`` of this finished run dir (e.g. a DoReMi
        proxy run); exclusive with ``prior``."""
        prior_steps: int = 0
        """Steps trained on p0 before the first round (the published two- and three-group
        scripts set PRIOR_STEPS = 250 for the restricted runs)."""
        floor: float = 0.0
        """Minimum weight of every domain outside probes (mixed with uniform); <= 1/m."""

        def __post_init__(self) -> None:
            for name in ("round_steps", "lp_rounds", "lp_steps"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
            if not 0.0 < self.one_hot_factor <= 1.0:
                raise ConfigError(f"one_hot_factor must be in (0, 1], got {self.one_hot_factor}.")
            if not (np.isfinite(self.eta) and self.eta >= 0):
                raise ConfigError(f"eta must be a finite number >= 0, got {self.eta}.")
            if not 0.0 <= self.ema < 1.0:
                raise ConfigError(f"ema must be in [0, 1) (0 = no smoothing), got {self.ema}.")
            if self.prior and self.prior_run:
                raise ConfigError("give either prior or prior_run, not both.")
            if self.prior_steps < 0:
                raise ConfigError(f"prior_steps must be >= 0, got {self.prior_steps}.")
            if self.floor < 0:
                raise ConfigError(f"floor must be >= 0, got {self.floor}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m, c = ctx.m, config.one_hot_factor
        if m < 2:
            raise ConfigError("aioli needs at least 2 domains.")
        self.lp_total = config.lp_rounds * m * config.lp_steps
        if self.lp_total >= config.round_steps:
            raise ConfigError(
                f"aioli's LearnParams takes lp_rounds * lp_steps * m = {config.lp_rounds} * "
                f"{config.lp_steps} * {m} = {self.lp_total} steps, which leaves no step of the "
                f"round_steps = {config.round_steps} round to train on the learned mixture; raise "
                f"round_steps above {self.lp_total} or lower lp_rounds / lp_steps."
            )
        if c <= 1.0 / m:
            raise ConfigError(
                f"one_hot_factor {c} must be above 1/m = {1 / m:.4g}, or the probes do not "
                "single out their domain."
            )
        if config.floor * m > 1 + 1e-12:
            raise ConfigError(f"floor {config.floor} is above 1/m = {1 / m:.4g}.")
        if config.prior_steps >= ctx.total_steps:
            raise ConfigError(
                f"prior_steps = {config.prior_steps} leaves no dynamic step of the "
                f"{ctx.total_steps}-step run; lower it."
            )
        if config.prior_run:
            self.p0 = run_final_weights(config.prior_run, ctx.domains, "mixer.options.prior_run")
        elif config.prior:
            self.p0 = weights_from_mapping(config.prior, ctx.domains, "mixer.options.prior")
        else:
            self.p0 = np.full(m, 1.0 / m)
        # Exact probe batches, fixed by the config: row j is what probe j really trains on.
        self.probe_counts = np.stack(
            [closest_counts(probe_mixture(m, j, c), ctx.batch_size) for j in range(m)]
        )
        self.realised = self.probe_counts / ctx.batch_size
        if np.linalg.matrix_rank(self.realised) < m:
            raise ConfigError(
                f"with batch_size {ctx.batch_size} and one_hot_factor {c} the {m} probe batches "
                "are not linearly independent, so A cannot be solved; raise the batch size or "
                "one_hot_factor."
            )
        self.p = self.p0.copy()
        self.A_bar: np.ndarray | None = None
        self.A_raw: np.ndarray | None = None
        self.rounds_done = 0
        self.rounds_skipped = 0
        self.B_sum = np.zeros((m, m))
        self.B_n = np.zeros(m, dtype=np.int64)
        self.last_eval: np.ndarray | None = None
        self.last_eval_step = -2  # no eval recorded yet (-1 is the initial model)

    # ------------------------------------------------------------------ schedule

    def _locate(self, step: int) -> tuple[str, int, int, int]:
        """(phase, round, probe slot, step within the slot) of 0-based ``step``."""
        cfg = self.config
        if step < cfg.prior_steps:
            return "prior", -1, -1, -1
        r, k = divmod(step - cfg.prior_steps, cfg.round_steps)
        if k < self.lp_total:
            slot, within = divmod(k, cfg.lp_steps)
            return "probe", r, slot, within
        return "train", r, -1, -1

    def _probe_index(self, r: int, slot: int) -> int:
        return int(probe_order(self.ctx.seed, r, self.ctx.m, self.config.lp_rounds)[slot])

    def _floored(self, p: np.ndarray) -> np.ndarray:
        return apply_floor(p, self.config.floor)

    # ------------------------------------------------------------------ protocol

    def plan(self, step: int) -> Plan:
        if step >= self.ctx.total_steps:  # after the run: the learned mixture is the output
            return Plan(weights=self._floored(self.p))
        phase, r, slot, _ = self._locate(step)
        if phase == "prior":
            return Plan(weights=self._floored(self.p0), phase="prior")
        if phase == "probe":
            counts = self.probe_counts[self._probe_index(r, slot)].copy()
            return Plan(weights=counts / self.ctx.batch_size, counts=counts, phase="probe")
        return Plan(weights=self._floored(self.p))

    def start(self, signals: Signals) -> None:
        if self._locate(0)[0] == "probe":
            self._record_eval(-1, signals)

    def observe(self, step: int, signals: Signals) -> None:
        # A round whose last probe step went unobserved is finished before anything of a later
        # round is recorded.
        self._finalize_through(step - 1)
        phase, r, slot, within = self._locate(step)
        next_phase, _, _, next_within = self._locate(step + 1)
        ends_probe = phase == "probe" and within == self.config.lp_steps - 1
        before_probe = next_phase == "probe" and next_within == 0
        if ends_probe:
            after = np.asarray(signals.eval_losses(), dtype=np.float64)
            slot_start = step - self.config.lp_steps + 1
            if self.last_eval is not None and self.last_eval_step == slot_start - 1:
                drop = self.last_eval - after
                if np.all(np.isfinite(drop)):
                    j = self._probe_index(r, slot)
                    self.B_sum[:, j] += drop
                    self.B_n[j] += 1
            self.last_eval, self.last_eval_step = after, step
        elif before_probe:
            self._record_eval(step, signals)
        self._finalize_through(step)

    def _record_eval(self, step: int, signals: Signals) -> None:
        self.last_eval = np.asarray(signals.eval_losses(), dtype=np.float64)
        self.last_eval_step = step

    def _finalize_through(self, step: int) -> None:
        """Update p for every round whose LearnParams ended at or before ``step``."""
        cfg = self.config
        while cfg.prior_steps + self.rounds_done * cfg.round_steps + self.lp_total - 1 <= step:
            self._finalize_round()

    def _finalize_round(self) -> None:
        cfg = self.config
        updated = False
        if np.all(self.B_n > 0):
            B = self.B_sum / self.B_n[None, :]
            A_raw = solve_A(self.realised, B)
            A = normalize_A(A_raw) if cfg.normalize else A_raw
            if np.all(np.isfinite(A)):
                A_bar = ema_update(self.A_bar, A, cfg.ema)
                base = self.p0 if cfg.anchor == "initial" else self.p
                p = aioli_update(base, A_bar, cfg.eta)
                if np.all(np.isfinite(p)):
                    self.A_raw, self.A_bar, self.p = A_raw, A_bar, p
                    updated = True
        self.rounds_skipped += 0 if updated else 1
        self.rounds_done += 1
        self.B_sum[:] = 0.0
        self.B_n[:] = 0

    # ------------------------------------------------------------------ state

    def report(self) -> dict[str, Any]:
        return {
            "p": self.p.tolist(),
            "A": None if self.A_bar is None else self.A_bar.tolist(),
            "A_raw": None if self.A_raw is None else self.A_raw.tolist(),
            "rounds": self.rounds_done,
            "rounds_skipped": self.rounds_skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "p": self.p.tolist(),
            "A_bar": None if self.A_bar is None else self.A_bar.tolist(),
            "A_raw": None if self.A_raw is None else self.A_raw.tolist(),
            "rounds_done": self.rounds_done,
            "rounds_skipped": self.rounds_skipped,
            "B_sum": self.B_sum.tolist(),
            "B_n": self.B_n.tolist(),
            "last_eval": None if self.last_eval is None else self.last_eval.tolist(),
            "last_eval_step": self.last_eval_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        m = self.ctx.m
        p = np.asarray(state["p"], dtype=np.float64)
        if p.shape != (m,):
            raise CheckpointError(f"aioli state has {p.size} domains, this run has {m}.")
        self.p = p
        self.A_bar = (
            None if state["A_bar"] is None else np.asarray(state["A_bar"], dtype=np.float64)
        )
        self.A_raw = (
            None if state["A_raw"] is None else np.asarray(state["A_raw"], dtype=np.float64)
        )
        self.rounds_done = int(state["rounds_done"])
        self.rounds_skipped = int(state["rounds_skipped"])
        self.B_sum = np.asarray(state["B_sum"], dtype=np.float64).reshape(m, m)
        self.B_n = np.asarray(state["B_n"], dtype=np.int64).reshape(m)
        last = state["last_eval"]
        self.last_eval = None if last is None else np.asarray(last, dtype=np.float64)
        self.last_eval_step = int(state["last_eval_step"])
