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

LearnParams runs ``lp_rounds`` random permutations ("sweeps") of the m probes; probe j trains
``lp_steps`` steps on P_j = c e_j + (1 - c)/(m - 1) (1 - e_j) (c = ``one_hot_factor``). Its
batches have an exact composition (``probe_counts``): c * batch rounded on domain j, the rest
split as evenly as integers allow, the leftover samples going to the domains after j (j+1, j+2,
... mod m) on even sweeps and before it on odd ones, shifted by one place every two sweeps. So
every sweep trains each domain on exactly ``batch`` of its m * batch samples, whatever the order
of the domains (with leftovers to the lowest index, as before issue 13, the probes of m = 7,
c = 0.75, batch 8 trained [.214 .214 .143 .107 .107 .107 .107] and the result depended on the
order of the domains). The mixture trained is the realised R_j = counts / batch, not P_j (the
published code probes with m=7, batch 8 batches that hold 0.545 of the probed group and none of
another). The drop of every domain's mixer-eval loss across probe j (eval at the step before it
starts and at its last step) gives column j of B, averaged over the measured sweeps; the law
says B[:, j] = A R_j with R_j the mean composition of those sweeps, so A = B R^{-T}.

Update after the probes of a round (the published scripts' path, ``--aioli_normalize_A --ema``):
A is shifted to be >= 0 and divided by its sum (``normalize``), smoothed across rounds,
Ā_r = (1 - ema) A_r + ema Ā_{r-1} (``ema`` is the weight on the old value), and

    anchor = "initial":  p_r ∝ a ⊙ exp(eta Σ_i Ā_r[i, :])        (published code with --ema)
    anchor = "previous": p_r ∝ p_{r-1} ⊙ exp(eta Σ_i Ā_r[i, :])  (the paper's EG step; the
                                                                   published code without --ema;
                                                                   p_{-1} = a)

with a = uniform, or the prior with ``keep_prior`` (below). ``variant = "published"`` (default)
is anchor "initial", eta 0.2: every published script sets ``--ema``, and then the code multiplies
the fixed initial vector, not the previous p (trainer/aioli_trainer.py:340); the EMA already
carries the history. With a normalised A (entries sum to 1, column sums in [0, 1], 1/m on
average) p stays within a factor exp(eta) of a, and in practice within ~1% of it.
``variant = "adaptive"`` is anchor "previous", eta 1: the paper's exponentiated-gradient step,
which accumulates the column sums round after round. Measured in synthetic worlds (issue 13;
10 seeds, m = 3 and 7, batch 8, 2500 steps, published round/probe settings, eval noise 1e-3;
gain = mean final loss minus stratified's, mean ± SE, negative is better):

    world                         published          adaptive           best fixed mixture
    linear law, m = 3            -0.0039 ± 0.0010   -0.1020 ± 0.0276   -0.430 ± 0.062
    linear law, m = 7            -0.0004 ± 0.0001   -0.0113 ± 0.0024   -0.362 ± 0.046
    diminishing returns, m = 3   -0.0002 ± 0.0001   -0.0029 ± 0.0010   -0.011 ± 0.002
    diminishing returns, m = 7   -0.0001 ± 0.0000   -0.0029 ± 0.0009   -0.031 ± 0.007

A larger eta with "previous" gains more in the linear law but overshoots where returns diminish
(eta 2: +0.0030 ± 0.0021 at m = 3 with noise 5e-3, i.e. worse than stratified; eta 1: -0.0001).

Restricted setting (a prior trained for ``prior_steps``): the published code forgets the prior
after the prior phase (trainer/aioli_trainer.py:231 resets ``weights_init`` to ones, which :340
and :343 multiply), so a = uniform: this is ``keep_prior = false``, the default when
prior_steps > 0. ``keep_prior = true`` (mixlab before issue 13) keeps the prior as a, which with
the "initial" anchor can never leave a factor exp(eta) of a bad prior: prior [.9 .05 .05] on
the worst domain of a linear law, 250 prior steps, gain vs stratified +0.035 ± 0.005 (published),
+0.314 ± 0.046 (keep_prior), -0.030 ± 0.010 (adaptive).

Robustness: a step with a non-finite loss is not observed by the trainer; a probe whose before
or after eval is missing (or non-finite) is left out of B; a round whose B misses a probe, or
whose A is not finite, keeps the previous p (counted in ``report()["rounds_skipped"]``). The
first probe's "before" eval comes from ``start()`` (the initial model).

**Branch probes (``probes = "branch"``, a mixlab variant, not the published method).** The
LearnParams steps above are real training steps on one-domain-heavy mixtures, and they cost:
in mixlab's benchmark suite (the demo's tiny GPT, 300 steps, 5 paired seeds) Aioli lost to
stratified sampling by +0.22 ± 0.07 nats of test loss (0/5 seeds better) with an unlearnable
random-token domain and +0.11 ± 0.06 on the 5 real domains, and Aioli with its probes but p
frozen at uniform (eta = 0) lost just as much (+0.21 ± 0.07, +0.11 ± 0.03): the loss comes
from the probe steps, not from the mixture Aioli picks. With ``probes = "branch"`` LearnParams
is measured on copies of the model and its optimizer, as Skill-It measures its skills graph
(``signals.branch_eval_deltas``), and never trains the run's model::

    [0, prior_steps)                 train on the prior p0 (phase "prior")
    then, for round r = 0, 1, ...:
      at its start (after step prior_steps + r U - 1 is observed; round 0 without a prior phase
      in ``start()``): for each sweep k < lp_rounds and probe j, a copy of the current model
      and optimizer trains lp_steps steps on batches of exactly probe_counts(sweep k)[j]; the
      drop of each domain's mixer-eval loss is its column j of B (mean over the sweeps);
      A = B R^{-T}, R the mean realised compositions (as above); p is updated as above
      U                              train on p (no probe phase in the plan)

Every copy of a round starts from the same model, so the sweeps differ only in their data and
in where the leftover samples of the rounding go: ``lp_rounds`` stays the number of repeated
measurements averaged into B. Branch k of round r reads data stream r + 1 (``stream`` of
``branch_eval_deltas``), a pure function of the round, so every round reads fresh windows and a
resumed run reads the same ones. The trade: no training step is disturbed, and every round costs
m · lp_rounds · lp_steps extra branch steps (counted in the run's ``extra_steps``, on top of
``train.steps``) plus m · lp_rounds evaluations of the mixer-eval windows. The branches train
at the learning rate of the step observed before the round (the last step of the previous
round, or of the prior phase; the schedule's step 0 for round 0). A round whose branch drops
are not finite for a probe in every sweep keeps p (``rounds_skipped``); when the trainer skips
the step before a round (a non-finite loss), the round's branches run after the next observed
step, and p changes from there. This needs a driver with branch copies of the whole model
(``needs_for``): ``mixlab train`` with DDP and the other full-model drivers, not FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mixlab.data.sampler import closest_counts
from mixlab.errors import CheckpointError, ConfigError
from mixlab.mixers._util import run_final_weights, weights_from_mapping
from mixlab.mixers.base import Mixer, MixerContext, Plan, Signals, apply_floor, register, softmax

# What ``variant`` sets where ``eta`` / ``anchor`` are not given (Config.variant).
_VARIANTS: dict[str, dict[str, Any]] = {
    "published": {"anchor": "initial", "eta": 0.2},
    "adaptive": {"anchor": "previous", "eta": 1.0},
}

# Salt of the probe-order stream, so it never coincides with another stream seeded by `seed`.
_ORDER_SALT = 0xA10E1

# What ``probes = "branch"`` needs of the driver (session.CAPABILITIES).
_BRANCH_NEEDS = frozenset({"full_model", "branches"})


# ---------------------------------------------------------------------------------------------
# Pure update rules.


def probe_mixture(m: int, j: int, c: float) -> np.ndarray:
    """[m] probe j: c on domain j, (1 - c)/(m - 1) on every other domain."""
    p = np.full(m, (1.0 - c) / (m - 1))
    p[j] = c
    return p


def probe_counts(m: int, c: float, batch: int, repeat: int = 0) -> np.ndarray:
    """[m, m] int64 exact batch compositions of the m probes in sweep ``repeat`` (row j = probe j).

    Probe j's counts are those of ``closest_counts(P_0, batch)`` (largest remainders, the probed
    domain first, so it wins ties) moved round the circle: domain j gets probe 0's count of its
    own domain, and the other counts o_1 >= o_2 >= ... (those holding a leftover sample of the
    rounding first) go to j + d, j + 2d, ... (mod m), rotated by s among those m - 1 places,
    with d = +1 on even sweeps and -1 on odd ones and s = repeat // 2. Every sweep is then a circulant: each domain
    is at distance t from its probe exactly once, so over the m probes of one sweep every domain
    gets exactly ``batch`` samples (the trained mixture of the probe phase is uniform), whatever
    the order of the domains. Odd sweeps mirror even ones, so with an even ``lp_rounds`` the mean
    composition of each probe is symmetric about it and reversing the domains reverses it too.
    ``closest_counts`` on each P_j instead (before issue 13) gave every leftover to the lowest
    domain index: m = 7, c = 0.75, batch 8 trained [.214 .214 .143 .107 .107 .107 .107].
    """
    base = closest_counts(probe_mixture(m, 0, c), batch)
    others = np.roll(base[1:], (repeat // 2) % (m - 1))
    step = 1 if repeat % 2 == 0 else -1
    out = np.zeros((m, m), dtype=np.int64)
    for j in range(m):
        out[j, j] = base[0]
        out[j, (j + step * np.arange(1, m)) % m] = others
    return out


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
    own_A = (
        ("A_raw", "Aioli: its latest raw estimate A_raw"),
        ("A", "Aioli: its normalised, smoothed A"),
    )

    needs_hint = "or set mixer.options.probes = 'train' (Aioli's published in-place probes)"

    @classmethod
    def needs_for(cls, config: Any) -> frozenset[str]:
        """Branch copies of the whole model with ``probes = "branch"``; nothing otherwise."""
        return cls.needs | (_BRANCH_NEEDS if config.probes == "branch" else frozenset())

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
        variant: Literal["published", "adaptive"] = "published"
        """Preset for ``anchor`` and ``eta`` where they are not given. 'published': anchor
        'initial', eta 0.2 (the published scripts' --ema path). 'adaptive': anchor 'previous',
        eta 1 (the paper's exponentiated-gradient step with the full-SlimPajama step size), which
        moves p much further from p0; measured in linear-law worlds in the module docstring."""
        eta: float | None = None
        """Step size of the exponentiated-gradient update (published: 0.2 two groups, 0.1 three,
        1 full). Unset: from ``variant`` (0.2 published, 1 adaptive)."""
        ema: float = 0.1
        """Weight of the previous round's A in its moving average; 0 disables smoothing
        (published: 0.1, 0.5 for three groups)."""
        normalize: bool = True
        """Shift A to be >= 0 and divide by its sum before the update (published scripts
        always set --aioli_normalize_A)."""
        anchor: Literal["initial", "previous"] | None = None
        """What the update multiplies: 'initial' p0 (published code with an EMA) or 'previous'
        p (the paper's exponentiated-gradient step); see the module docstring. Unset: from
        ``variant`` ('initial' published, 'previous' adaptive)."""
        prior: dict[str, float] = field(default_factory=dict)
        """Restricted setting: p0 given per domain (any positive scale); empty = uniform."""
        prior_run: str | None = None
        """Restricted setting: p0 = ``weights_final`` of this finished run dir (e.g. a DoReMi
        proxy run); exclusive with ``prior``."""
        prior_steps: int = 0
        """Steps trained on p0 before the first round (the published two- and three-group
        scripts set PRIOR_STEPS = 250 for the restricted runs)."""
        keep_prior: bool | None = None
        """Whether the updates after the prior phase still start from the prior. false: they
        start from uniform, the prior only decides what the first ``prior_steps`` train on (the
        published code, trainer/aioli_trainer.py:231); true: the prior stays the anchor (mixlab
        before issue 13; with the 'initial' anchor p then stays within exp(eta) of the prior).
        Unset: false when prior_steps > 0 (the restricted setting as published), true when
        prior_steps = 0, where there is no prior phase and the prior would otherwise do nothing
        (``mixlab sweep`` hands its mixture to Aioli this way)."""
        floor: float = 0.0
        """Minimum weight of every domain outside probes (mixed with uniform); <= 1/m."""
        probes: Literal["train", "branch"] = "train"
        """Where LearnParams trains its probes. 'train' (published): lp_rounds * m * lp_steps
        real steps of every round train the run's model on the probe mixtures. 'branch' (a
        mixlab variant): each probe trains a copy of the model and optimizer at the start of
        the round and every step of the round trains on p; costs m * lp_rounds * lp_steps
        extra branch steps per round and needs a driver with branch copies (not FSDP). Why
        (the probe steps cost test loss in mixlab's benchmark): the module docstring."""

        def __post_init__(self) -> None:
            preset = _VARIANTS[self.variant]
            if self.eta is None:
                self.eta = preset["eta"]
            if self.anchor is None:
                self.anchor = preset["anchor"]
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
            if self.keep_prior is None:
                self.keep_prior = self.prior_steps == 0
            if self.floor < 0:
                raise ConfigError(f"floor must be >= 0, got {self.floor}.")

    def __init__(self, config: Config, ctx: MixerContext):
        super().__init__(config, ctx)
        m, c = ctx.m, config.one_hot_factor
        if m < 2:
            raise ConfigError("aioli needs at least 2 domains.")
        self.branch = config.probes == "branch"
        # Probe steps per round: in the plan ("train"), or on branch copies ("branch").
        self.probe_steps = config.lp_rounds * m * config.lp_steps
        self.lp_total = 0 if self.branch else self.probe_steps
        if not self.branch and self.lp_total >= config.round_steps:
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
        # Exact probe batches, fixed by the config: [sweep, j] is what probe j of that sweep
        # really trains on; ``realised`` [m, m] is its mean over a round's sweeps (row j), the R
        # that A is solved with when every probe of the round was measured.
        self.probe_counts = np.stack(
            [probe_counts(m, c, ctx.batch_size, k) for k in range(config.lp_rounds)]
        )
        self.realised = self.probe_counts.mean(axis=0) / ctx.batch_size
        if np.linalg.matrix_rank(self.realised) < m:
            raise ConfigError(
                f"with batch_size {ctx.batch_size} and one_hot_factor {c} the {m} probe batches "
                "are not linearly independent, so A cannot be solved; raise the batch size or "
                "one_hot_factor."
            )
        # What the update starts from (module docstring): the prior only with keep_prior.
        self.anchor_p = self.p0.copy() if config.keep_prior else np.full(m, 1.0 / m)
        self.p = self.p0.copy()
        self.A_bar: np.ndarray | None = None
        self.A_raw: np.ndarray | None = None
        self.rounds_done = 0
        self.rounds_skipped = 0
        self.B_sum = np.zeros((m, m))
        self.B_n = np.zeros(m, dtype=np.int64)
        self.R_sum = np.zeros((m, m))  # row j: sum of probe j's measured compositions
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
            counts = self.probe_counts[slot // self.ctx.m, self._probe_index(r, slot)].copy()
            return Plan(weights=counts / self.ctx.batch_size, counts=counts, phase="probe")
        return Plan(weights=self._floored(self.p))

    def start(self, signals: Signals) -> None:
        if self.branch:
            self._branch_rounds(-1, signals)
        elif self._locate(0)[0] == "probe":
            self._record_eval(-1, signals)

    def observe(self, step: int, signals: Signals) -> None:
        if self.branch:
            self._branch_rounds(step, signals)
            return
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
                    self.R_sum[j] += self.probe_counts[slot // self.ctx.m, j] / self.ctx.batch_size
            self.last_eval, self.last_eval_step = after, step
        elif before_probe:
            self._record_eval(step, signals)
        self._finalize_through(step)

    def _branch_rounds(self, step: int, signals: Signals) -> None:
        """``probes = "branch"``: measure and finish the round that starts after ``step``, or
        the latest round whose start came after an unobserved step (the rounds in between are
        skipped)."""
        cfg = self.config
        nxt = step + 1  # the first step the measurement can change
        if nxt < cfg.prior_steps or nxt >= self.ctx.total_steps:
            return
        r = (nxt - cfg.prior_steps) // cfg.round_steps
        if r < self.rounds_done:
            return
        self.rounds_skipped += r - self.rounds_done
        self.rounds_done = r
        m, batch = self.ctx.m, self.ctx.batch_size
        counts = self.probe_counts.reshape(cfg.lp_rounds * m, m)  # row k * m + j: sweep k, probe j
        drops = np.asarray(
            signals.branch_eval_deltas(counts / batch, cfg.lp_steps, counts=counts, stream=r + 1),
            dtype=np.float64,
        ).reshape(cfg.lp_rounds, m, m)
        for k in range(cfg.lp_rounds):
            for j in range(m):
                if np.all(np.isfinite(drops[k, j])):
                    self.B_sum[:, j] += drops[k, j]
                    self.B_n[j] += 1
                    self.R_sum[j] += self.probe_counts[k, j] / batch
        self._finalize_round()

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
            # The mean composition of the sweeps that were measured: B[:, j] = A R[j] holds for
            # that mean, whichever sweeps of probe j went unobserved.
            A_raw = solve_A(self.R_sum / self.B_n[:, None], B)
            A = normalize_A(A_raw) if cfg.normalize else A_raw
            if np.all(np.isfinite(A)):
                A_bar = ema_update(self.A_bar, A, cfg.ema)
                # "previous" starts from the anchor too until a first update succeeded (the
                # published no-EMA path, trainer/aioli_trainer.py:342-345).
                first = self.A_bar is None
                base = self.anchor_p if cfg.anchor == "initial" or first else self.p
                p = aioli_update(base, A_bar, cfg.eta)
                if np.all(np.isfinite(p)):
                    self.A_raw, self.A_bar, self.p = A_raw, A_bar, p
                    updated = True
        self.rounds_skipped += 0 if updated else 1
        self.rounds_done += 1
        self.B_sum[:] = 0.0
        self.B_n[:] = 0
        self.R_sum[:] = 0.0

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
            "R_sum": self.R_sum.tolist(),
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
        if "R_sum" not in state:
            raise CheckpointError(
                "aioli state has no R_sum: it was written before the probe batches became "
                "balanced (issue 13), and this version probes different batches; restart the run."
            )
        self.R_sum = np.asarray(state["R_sum"], dtype=np.float64).reshape(m, m)
        last = state["last_eval"]
        self.last_eval = None if last is None else np.asarray(last, dtype=np.float64)
        self.last_eval_step = int(state["last_eval_step"])
