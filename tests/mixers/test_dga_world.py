"""DGA in a quadratic world with a known answer, driven through the real mixer.

The world: parameters θ ∈ R^d; a sample x of domain i has loss ½‖θ − c_i − σ ξ_x‖² (ξ_x ~ N(0, I)),
so its gradient is g_x = θ − c_i − σ ξ_x and domain i's expected gradient is θ − c_i; the target
loss is L_S(θ) = ½‖θ − c_S‖², and the mixer sees its gradient through a probe set of
``TARGET_SAMPLES`` noisy samples, as the alignment engine does (``target_windows``). Domain 0
*is* the target's domain (c_0 = c_S): its gradient aligns with the target's everywhere, so the
best mixture is all of domain 0 (L_S → 0 up to SGD noise), while the stratified mixture
converges to the mean of the c_i, a fixed distance from c_S. Training is SGD on a batch drawn
from the mixer's plan; every ``update_every`` steps the mixer asks for per-sample alignments
⟨g_x, g_S⟩, which this world computes in closed form. Nothing here imports the expected answer
from mixlab: the optimum (all weight on domain 0) and the stratified loss follow from the
construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tests.mixers.align_fakes import AlignSignals
from tests.mixers.fakes import make_ctx

from mixlab.mixers import build_mixer
from mixlab.signals.alignment import SampleAlignments

D, K = 8, 4
"""Parameter dimension, number of domains."""
STEPS, BATCH, LR = 600, 8, 0.05
SIGMA = 0.5
"""Per-sample gradient noise (each coordinate)."""
TARGET_SAMPLES = 4
"""Target probe samples behind g_S at every update (the mixer's ``target_windows``)."""
UPDATE_EVERY = 5


@dataclass
class WorldRun:
    target_loss: float
    """L_S averaged over the last 10% of the steps (SGD noise makes a single step jumpy)."""
    weights: np.ndarray
    """[K] the mixer's final planned mixture."""
    max_weight_0: float
    """The largest weight domain 0 reached."""
    steps: np.ndarray
    """[updates] the spread max_i - min_i of η·â at every update (how far the step moves z)."""
    planned: np.ndarray
    """[STEPS, K] every planned mixture."""


def world(seed: int, best: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres [K, D], c_S [D], θ_0 [D]) of the world for ``seed``: c_0 = 0, the other
    centres at distance 2 in random directions, θ_0 at distance 3 in a random direction;
    c_S = Σ_i best_i c_i (default best = e_0: c_S = c_0)."""
    rng = np.random.default_rng([7, seed])
    unit = rng.standard_normal((K + 1, D))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    centres = np.vstack([np.zeros(D), 2.0 * unit[: K - 1]])
    mix = np.eye(K)[0] if best is None else np.asarray(best, dtype=np.float64)
    return centres, mix @ centres, 3.0 * unit[K]


def run_world(seed: int, mixer_name: str = "dga", best: np.ndarray | None = None,
              sigma: float = SIGMA, target_samples: int = TARGET_SAMPLES, **options) -> WorldRun:
    """Train the quadratic world for ``STEPS`` SGD steps on the mixtures the mixer plans."""
    centres, c_s, theta = world(seed, best)
    rng = np.random.default_rng([11, seed])
    if mixer_name == "dga":
        options = {"update_every": UPDATE_EVERY, **options}
    mixer = build_mixer(mixer_name, options, make_ctx(K, STEPS, BATCH))
    state = {"theta": theta}

    def measure(counts: np.ndarray, direction: str, probes: int) -> SampleAlignments:
        th = state["theta"]
        domains = np.repeat(np.arange(K), counts)
        g_x = th - centres[domains] - sigma * rng.standard_normal((domains.size, D))
        g_s = th - c_s - sigma * rng.standard_normal((target_samples, D)).mean(axis=0)
        return SampleAlignments(values=g_x @ g_s, domains=domains,
                                direction_sq_norm=float(g_s @ g_s))

    eta = float(getattr(mixer.config, "eta", 0.0))
    losses, planned, spreads = [], [], []
    for step in range(STEPS):
        w = np.asarray(mixer.plan(step).weights, dtype=np.float64)
        planned.append(w)
        d = rng.choice(K, size=BATCH, p=w)
        grad = (state["theta"] - centres[d] - sigma * rng.standard_normal((BATCH, D))).mean(axis=0)
        state["theta"] = state["theta"] - LR * grad
        losses.append(0.5 * float(np.sum((state["theta"] - c_s) ** 2)))
        mixer.observe(step, AlignSignals(step, measure=measure))
        if (step + 1) % UPDATE_EVERY == 0 and mixer_name == "dga":
            a_hat = np.asarray(mixer.report()["alignment"], dtype=np.float64)
            spreads.append(eta * float(a_hat.max() - a_hat.min()))
    tail = losses[-STEPS // 10:]
    plans = np.asarray(planned)
    return WorldRun(float(np.mean(tail)), np.asarray(mixer.plan(STEPS).weights),
                    float(plans[:, 0].max()), np.asarray(spreads), plans)


SEEDS = range(5)
INTERIOR = np.array([0.6, 0.4, 0.0, 0.0])
"""c_S = 0.6 c_0 + 0.4 c_1: the best mixture is inside the simplex, so the method has to settle
there instead of saturating on a vertex (where an over-long step costs nothing)."""
QUIET = {"sigma": 0.25, "target_samples": 64}
"""A well-measured target gradient (64 probe samples, half the noise): near the best mixture
g_S really becomes small, which is where the raw and the normalised steps part ways."""


def check_plans(plans: np.ndarray) -> None:
    assert np.all(np.isfinite(plans)) and np.all(plans >= 0)
    # Each plan is a softmax normalised in float64: its sum is 1 up to ~k ulps.
    np.testing.assert_allclose(plans.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_aligned_domain_goes_up_and_the_target_loss_beats_stratified():
    """Default options (the published raw step, η = 1): domain 0, whose gradient is the
    target's, ends with most of the weight, and the target loss ends far below stratified's."""
    for seed in SEEDS:
        run, strat = run_world(seed), run_world(seed, "stratified")
        check_plans(run.planned)
        centres, c_s, _ = world(seed)
        # Stratified converges to θ = mean_i c_i, whose target loss is ½‖mean c - c_S‖² (0.24
        # to 0.56 for these seeds); all of domain 0 reaches the SGD noise floor, about
        # ½ D · lr σ² / (B (2 - lr)) = 0.003 (measured 0.0025 to 0.0048). A tenth of the
        # stratified limit is more than 6x above the measured loss in every seed.
        limit = 0.5 * float(np.sum((centres.mean(axis=0) - c_s) ** 2))
        assert run.target_loss < strat.target_loss and run.target_loss < 0.1 * limit, seed
        # From 1/K = 0.25 to most of the mass: measured 0.964 to 1.0 for these seeds; 0.9
        # leaves room for the noise of the mixer's measurements.
        assert run.weights[0] > 0.9 and run.weights.argmax() == 0, (seed, run.weights)


def test_the_raw_step_anneals_and_the_normalised_one_does_not():
    """Near the best mixture g_S shrinks while the g_i do not: the raw step η·a shrinks with
    it, the normalised η·a/<g_S, g_S> grows (finding 7 of issue 13)."""
    for seed in SEEDS:
        ratios = {}
        for name, options in (("raw", {}), ("target", {"normalize": "target"})):
            run = run_world(seed, best=INTERIOR, **QUIET, **options)
            check_plans(run.planned)
            tenth = run.steps.size // 10
            ratios[name] = run.steps[-tenth:].mean() / run.steps[:tenth].mean()
        # Measured over 10 seeds: raw 0.07 to 0.21, target 2.7 to 5.1; each bound sits about
        # halfway, in log ratio, between the measured range and 1 (no annealing).
        assert ratios["raw"] < 0.5 and ratios["target"] > 1.5, (seed, ratios)


def test_raw_default_reaches_a_lower_target_loss_than_the_normalised_variant():
    """The measured evidence behind the default (η = 1 for both, 10 seeds, paired): final
    target loss 0.0026 ± 0.0002 (raw) vs 0.045 ± 0.011 (target) in the quiet interior world."""
    raw, tgt = [], []
    for seed in range(10):
        raw.append(run_world(seed, best=INTERIOR, **QUIET).target_loss)
        tgt.append(run_world(seed, best=INTERIOR, **QUIET, normalize="target").target_loss)
    diff = np.asarray(raw) - np.asarray(tgt)
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    # The paired mean is more than 2 standard errors below 0 (a one-sided ~98% bound; measured
    # -0.042 ± 0.011, about 4 SE), and raw wins in every seed (10/10 measured).
    assert diff.mean() + 2 * se < 0, (diff.mean(), se)
    assert np.all(diff < 0), diff
