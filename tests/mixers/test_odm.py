"""ODM: the EXP3 schedule, importance-weighted rewards and both estimators, by hand."""

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


def test_smoothed_sequence_hand_computed():
    plans = run(odm(variant="smoothed", smoothing=0.9))
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


@pytest.mark.parametrize("variant", ["exp3", "smoothed"])
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
