"""ODM: the EXP3 schedule, importance-weighted rewards and the estimators, by hand and against
plain-Python re-implementations of the reference updaters (alon-albalak/online-data-mixing
``megatron/data/data_sampling_utils.py``, ``group_update`` of Exp3WeightUpdater and
SmoothedMeanWeightUpdater)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.mixers.fakes import FakeSignals, make_ctx

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.odm import (
    exp3_probabilities,
    exploration_rate,
    importance_rewards,
    linear_probabilities,
    smoothed_exp_update,
    smoothed_update,
)

NAN = float("nan")


def odm(m=3, total=100, **options):
    return build_mixer("odm", options, make_ctx(m, total, batch_size=4))


def softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_exploration_rate():
    assert exploration_rate(0, 3) == 1 / 3
    assert exploration_rate(3, 3) == 1 / 3  # sqrt(ln 3 / 9) = 0.349 > 1/3
    assert exploration_rate(4, 3) == math.sqrt(math.log(3) / 12)
    assert exploration_rate(1000, 8) == math.sqrt(math.log(8) / 8000)
    assert exploration_rate(5, 1) == 0.0


def test_importance_rewards():
    x = importance_rewards(
        np.array([3.0, NAN, 4.0]), np.array([2, 0, 2]), np.array([0.5, 0.25, 0.25]), 0.1
    )
    np.testing.assert_allclose(x, [0.5 * 0.3 / 0.5, 0.0, 0.5 * 0.4 / 0.25], rtol=1e-15)
    # One sample (the published one-domain minibatch): x = r / p of the sampled arm.
    x = importance_rewards(np.array([2.0, NAN]), np.array([1, 0]), np.array([0.25, 0.75]), 0.1)
    np.testing.assert_allclose(x, [0.8, 0.0], rtol=1e-15)
    np.testing.assert_array_equal(
        importance_rewards(np.array([NAN, NAN]), np.zeros(2), np.full(2, 0.5), 0.1), [0, 0]
    )


def test_exp3_probabilities():
    p = exp3_probabilities(np.array([10.0, 0.0, 5.0]), eps_prev=0.3, eps_now=0.25)
    s = softmax([3.0, 0.0, 1.5])
    np.testing.assert_allclose(p, [0.25 * v + 0.25 for v in s], rtol=1e-15)
    # Huge or overflowed estimates stay finite: all the exploitable mass on the best arm.
    np.testing.assert_allclose(
        exp3_probabilities(np.array([np.inf, 1e300, 0.0]), 0.3, 0.25), [0.5, 0.25, 0.25]
    )


def test_smoothed_update():
    R = smoothed_update(
        np.array([1.0, 2.0, 3.0]), np.array([10.0, 10.0, 10.0]), np.array([True, False, True]), 0.9
    )
    np.testing.assert_allclose(R, [1.9, 2.0, 3.7], rtol=1e-15)


BATCHES = [  # (counts, losses) of five steps, batch 4
    ([4, 0, 0], [2.0, NAN, NAN]),
    ([0, 4, 0], [NAN, 3.0, NAN]),
    ([0, 0, 4], [NAN, NAN, 1.0]),
    ([2, 2, 0], [2.0, 3.0, NAN]),
    ([1, 1, 2], [1.0, 1.0, 1.0]),
]


def run(mixer):
    plans = []
    for step, (counts, losses) in enumerate(BATCHES):
        plans.append(mixer.plan(step).weights)
        mixer.observe(step, FakeSignals(step, counts=np.array(counts), train=np.array(losses)))
    plans.append(mixer.plan(len(BATCHES)).weights)
    return plans


def expected(smoothing=None):
    """The published recursion written out with plain floats."""
    R, p, out = [0.0] * 3, [1 / 3] * 3, [[1 / 3] * 3]
    for t, (counts, losses) in enumerate(BATCHES, start=1):
        x = [counts[k] / 4 * 0.1 * losses[k] / p[k] if counts[k] else 0.0 for k in range(3)]
        if smoothing is None:
            R = [R[k] + x[k] for k in range(3)]
        else:
            R = [smoothing * R[k] + (1 - smoothing) * x[k] if counts[k] else R[k] for k in range(3)]
        prev = 1 / 3 if t == 1 else min(1 / 3, math.sqrt(math.log(3) / (3 * (t - 1))))
        now = min(1 / 3, math.sqrt(math.log(3) / (3 * t)))
        p = [(1 - 3 * now) * v + now for v in softmax([prev * r for r in R])]
        out.append(p)
    return out


def test_exp3_sequence_hand_computed():
    mixer = odm()
    plans = run(mixer)
    want = expected()
    for got, exp in zip(plans, want):
        np.testing.assert_allclose(got, exp, rtol=1e-14)
    # t <= m ln m: exploration takes all the mass; t = 4 is the first non-uniform step.
    np.testing.assert_array_equal(plans[3], [1 / 3] * 3)
    assert plans[4][1] > plans[4][0] > plans[4][2]
    np.testing.assert_allclose(
        mixer.report()["reward_estimates"],
        [
            0.6 + 0.3 + 0.25 * 0.1 / want[4][0],
            0.9 + 0.45 + 0.25 * 0.1 / want[4][1],
            0.3 + 0.5 * 0.1 / want[4][2],
        ],
        rtol=1e-14,
    )


def test_smoothed_iw_sequence_hand_computed():
    plans = run(odm(variant="smoothed_iw", smoothing=0.9))
    for got, exp in zip(plans, expected(smoothing=0.9)):
        np.testing.assert_allclose(got, exp, rtol=1e-14)


def test_warmup_keeps_uniform_and_ignores_rewards():
    mixer = odm(warmup_steps=2)
    for step in range(2):
        mixer.observe(
            step, FakeSignals(step, counts=np.array([4, 0, 0]), train=np.array([9.0, NAN, NAN]))
        )
    np.testing.assert_array_equal(mixer.report()["reward_estimates"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(mixer.plan(2).weights, [1 / 3] * 3)


@pytest.mark.parametrize("variant", ["exp3", "smoothed", "smoothed_iw"])
def test_long_run_is_stable_and_keeps_exploring(variant):
    mixer = odm(m=3, total=5000, variant=variant)
    for step in range(5000):
        p = mixer.plan(step).weights
        assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-12
        assert p.min() >= exploration_rate(step, 3) - 1e-15
        counts = np.array([2, 1, 1])
        mixer.observe(step, FakeSignals(step, counts=counts, train=np.array([1e30, 1.0, 1e-30])))
    assert mixer.report()["p"][0] > 0.9


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "ucb"}, "not one of"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"reward_scale": 0.0}, "reward_scale"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        odm(**options)


# ---------------------------------------------------------------------------------------------
# Against the reference updaters, re-implemented here with plain floats (issue 13, findings 6, 9).


def reference_group_updates(batches, m, variant, smoothing=0.9, warmup=0):
    """The reference's mixed-minibatch loop (megatron/training.py:1175-1267) around
    ``group_update`` (data_sampling_utils.py:421-453 for exp3, 501-528 for smoothed_mean), with
    plain floats: each step, the domains present in the batch report their mean loss; the
    updater is not called during warm-up (training.py:1047) nor when iteration <= warmup
    (UpdateScheduler.requires_update, line 320). Returns the weights before every step and after
    the last."""
    weights = [1.0 / m] * m
    probs = list(weights)
    eps, prev_eps = 1.0 / m, None
    est = [0.0] * m
    out = [list(probs)]
    for iteration, (counts, losses) in enumerate(batches, start=1):
        if iteration > warmup:
            prev_eps = eps
            eps = min(1.0 / m, math.sqrt(math.log(m) / (m * iteration)))
            for k in range(m):
                if counts[k]:
                    if variant == "exp3":
                        est[k] += (losses[k] / 10) / probs[k]
                    else:
                        est[k] = smoothing * est[k] + (1 - smoothing) * math.exp(losses[k])
            if variant == "exp3":
                total = sum(math.exp(r * prev_eps) for r in est)
                scale = (1 - m * eps) / total
                weights = [math.exp(est[k] * prev_eps) * scale + eps for k in range(m)]
            else:
                total = sum(r * prev_eps for r in est)
                scale = (1 - m * eps) / total
                weights = [est[k] * prev_eps * scale + eps for k in range(m)]
            probs = [w / sum(weights) for w in weights]
        out.append(list(probs))
    return out


def random_batches(steps, m, seed, one_domain=False):
    """Seeded (counts, losses) per step, batch 4: losses in [0.5, 6]; some domains absent."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(steps):
        if one_domain:
            counts = np.zeros(m, dtype=np.int64)
            counts[rng.integers(m)] = 4
        else:
            counts = np.bincount(rng.integers(m, size=4), minlength=m)
        losses = np.where(counts > 0, rng.uniform(0.5, 6.0, size=m), np.nan)
        batches.append((counts.tolist(), losses.tolist()))
    return batches


def drive_odm(mixer, batches):
    plans = []
    for step, (counts, losses) in enumerate(batches):
        plans.append(mixer.plan(step).weights)
        mixer.observe(step, FakeSignals(step, counts=np.array(counts), train=np.array(losses)))
    plans.append(mixer.plan(len(batches)).weights)
    return np.array(plans)


@pytest.mark.parametrize("smoothing", [0.9, 0.5])
def test_smoothed_follows_the_reference_smoothed_mean_updater(smoothing):
    """Finding 6: the reference smooths exp(loss) (no 1/π, no /10) and takes π ∝ R. 400 steps
    of mixed batches with absent domains, 4 domains, warm-up 20. Tolerance: the mixer keeps
    log R (logaddexp) where the reference keeps R; each update rounds both by a few ulp and the
    moving average contracts old errors by α < 1, so the error stays ~1e-15 relative; 1e-12
    leaves room and still catches any change of the rule (the old rule differs by > 0.1)."""
    m, batches = 4, random_batches(400, 4, seed=3)
    got = drive_odm(odm(m=m, total=400, variant="smoothed", smoothing=smoothing, warmup_steps=20),
                    batches)
    want = np.array(reference_group_updates(batches, m, "smoothed", smoothing, warmup=20))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert np.abs(got[-1] - 0.25).max() > 0.05  # it moved


def test_exp3_first_update_after_warmup_follows_the_reference():
    """Finding 9: the reference's updater keeps ε of its previous call (1/m before the first),
    so the first update after warm-up uses 1/m, not ε_{t-1}. One domain per batch (the
    reference's group_update adds r/π once per present domain; with one domain n_k/b = 1, so the
    two coincide). 300 steps, warm-up 50. Tolerance: R̂ sums ~250 terms of float64 in the same
    order in both, and π = a softmax of ε·R̂ with ε·R̂ = O(10): relative error ~1e-14."""
    m, batches = 3, random_batches(300, 3, seed=7, one_domain=True)
    got = drive_odm(odm(m=m, total=300, warmup_steps=50), batches)
    want = np.array(reference_group_updates(batches, m, "exp3", warmup=50))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_first_update_after_warmup_by_hand():
    """t = 11 after 10 warm-up steps, domain 0 alone with loss 3: R̂ = [0.3 / (1/3), 0, 0] and
    π = (1 - 3 ε_11) softmax(ε_prev R̂) + ε_11 with ε_prev = 1/3 (not ε_10 = sqrt(ln 3 / 30))."""
    mixer = odm(warmup_steps=10)
    for step in range(10):
        mixer.observe(step, FakeSignals(step, counts=np.array([4, 0, 0]), train=np.array([9.0, NAN, NAN])))
    mixer.observe(10, FakeSignals(10, counts=np.array([4, 0, 0]), train=np.array([3.0, NAN, NAN])))
    eps = math.sqrt(math.log(3) / 33)
    s = softmax([0.9 / 3, 0.0, 0.0])
    np.testing.assert_allclose(mixer.plan(11).weights, [(1 - 3 * eps) * v + eps for v in s], rtol=1e-15)


def test_smoothed_gives_an_unlearnable_domain_the_most_mass():
    """ODM's reward is the training loss, so a random-token domain (loss stuck at ln V) is
    *up*-weighted: that is the method's semantics. With every domain in every batch at constant
    losses r, R_k = (1 - α^n) exp(r_k) after n updates: the common factor cancels in π ∝ R, so
    from the first update on π = (1 - m ε_t) softmax(r) + ε_t exactly (hand derivation)."""
    r = np.array([math.log(64), 2.0, 1.5])  # domain 0: uniform guess over a 64-token vocabulary
    mixer = odm(variant="smoothed", total=200)
    for step in range(200):
        mixer.observe(step, FakeSignals(step, counts=np.array([2, 1, 1]), train=r))
        eps = exploration_rate(step + 1, 3)
        e = np.exp(r - r.max())
        # 1e-14: softmax of log R vs of r: a few ulp of R's recursion (see the test above).
        np.testing.assert_allclose(mixer.plan(step + 1).weights, (1 - 3 * eps) * e / e.sum() + eps,
                                   rtol=1e-14)
    assert int(np.argmax(mixer.plan(200).weights)) == 0


def test_smoothed_exp_update_and_linear_probabilities_by_hand():
    logR = smoothed_exp_update(np.array([math.log(2.0), -np.inf, 0.0]), np.array([1.0, 2.0, NAN]),
                               np.array([True, True, False]), 0.9)
    np.testing.assert_allclose(np.exp(logR), [0.9 * 2 + 0.1 * math.e, 0.1 * math.e**2, 1.0],
                               rtol=1e-15)
    p = linear_probabilities(np.array([0.0, math.log(3.0), -np.inf]), 0.1)
    np.testing.assert_allclose(p, [0.7 * 0.25 + 0.1, 0.7 * 0.75 + 0.1, 0.1], rtol=1e-15)
    # A loss that overflows exp() stays finite: all the exploitable mass on that domain.
    p = linear_probabilities(smoothed_exp_update(np.full(2, -np.inf), np.array([1e30, 1.0]),
                                                 np.array([True, True]), 0.9), 0.25)
    np.testing.assert_allclose(p, [0.75, 0.25])
