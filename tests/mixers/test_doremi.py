"""DoReMi: the excess-loss update against hand-computed values, averaging, sampling modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tests.mixers.fakes import FakeSignals, make_ctx

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.doremi import doremi_update, excess_losses, running_mean

NAN = float("nan")


def doremi(m=2, total=10, **options):
    return build_mixer("doremi", options, make_ctx(m, total))


def sig(step, counts, train, ref):
    return FakeSignals(
        step, counts=np.array(counts), train=np.array(train), reference=np.array(ref)
    )


def smooth(a, eps=1e-3):
    a = np.asarray(a)
    return (1 - eps) * a + eps / a.size


def test_excess_losses_clip_at_zero_and_keep_nan():
    np.testing.assert_array_equal(excess_losses([3.0, 2.0, NAN], [2.5, 2.5, 1.0]), [0.5, 0.0, NAN])


def test_doremi_update():
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    np.testing.assert_allclose(
        doremi_update(np.array([0.5, 0.5]), np.array([0.5, 0.0]), 1.0, 1e-3),
        smooth([sigma, 1 - sigma]),
        rtol=1e-15,
    )
    # A step of eta=2 on [0.2, 0.8] with scores [1, 0].
    e0, e1 = 0.2 * math.exp(2.0), 0.8
    np.testing.assert_allclose(
        doremi_update(np.array([0.2, 0.8]), np.array([1.0, 0.0]), 2.0, 0.01),
        smooth([e0 / (e0 + e1), e1 / (e0 + e1)], 0.01),
        rtol=1e-15,
    )
    # Huge scores: one-hot, then the smoothing floor eps/m.
    np.testing.assert_allclose(
        doremi_update(np.array([0.5, 0.5]), np.array([1e30, 0.0]), 1.0, 1e-3),
        [0.9995, 0.0005],
        rtol=1e-15,
    )


def test_running_mean():
    np.testing.assert_allclose(
        running_mean(np.array([0.2, 0.8]), np.array([0.6, 0.4]), 2), [0.4, 0.6]
    )


def test_two_steps_hand_computed_absent_domain_keeps_its_score():
    mixer = doremi()
    np.testing.assert_array_equal(mixer.plan(0).weights, [0.5, 0.5])
    np.testing.assert_array_equal(mixer.plan(0).loss_weights, [0.5, 0.5])
    s0 = sig(0, [4, 4], [3.0, 2.0], [2.5, 2.5])
    mixer.observe(0, s0)
    assert sorted(set(s0.calls)) == ["reference_losses", "train_counts", "train_losses"]
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    a1 = smooth([sigma, 1 - sigma])
    np.testing.assert_allclose(mixer.plan(1).loss_weights, a1, rtol=1e-15)
    np.testing.assert_array_equal(mixer.plan(1).weights, [0.5, 0.5])
    # Domain 0 absent: its score stays 0.5; domain 1's excess is 1.0.
    mixer.observe(1, sig(1, [0, 8], [NAN, 3.0], [NAN, 2.0]))
    e = a1 * np.exp([0.5, 1.0])
    a2 = smooth(e / e.sum())
    np.testing.assert_allclose(mixer.plan(2).loss_weights, a2, rtol=1e-14)
    np.testing.assert_allclose(mixer.report()["excess"], [0.5, 1.0])
    # The proxy's output is the average of alpha over the updates.
    np.testing.assert_allclose(mixer.plan(10).weights, (a1 + a2) / 2, rtol=1e-14)
    np.testing.assert_allclose(mixer.report()["alpha_avg"], (a1 + a2) / 2, rtol=1e-14)


def test_update_every_averages_the_excess_over_samples():
    mixer = doremi(update_every=2)
    mixer.observe(0, sig(0, [2, 6], [3.0, 2.0], [2.5, 2.5]))  # excess [0.5, 0]
    np.testing.assert_array_equal(mixer.plan(1).loss_weights, [0.5, 0.5])
    mixer.observe(1, sig(1, [6, 2], [3.5, 3.0], [2.5, 2.5]))  # excess [1.0, 0.5]
    s = np.array([(2 * 0.5 + 6 * 1.0) / 8, (6 * 0.0 + 2 * 0.5) / 8])
    e = np.exp(s)
    np.testing.assert_allclose(mixer.plan(2).loss_weights, smooth(e / e.sum()), rtol=1e-15)


def test_sampling_by_alpha():
    mixer = doremi(sampling="alpha")
    mixer.observe(0, sig(0, [4, 4], [3.0, 2.0], [2.5, 2.5]))
    plan = mixer.plan(1)
    assert plan.loss_weights is None
    sigma = math.exp(0.5) / (math.exp(0.5) + 1)
    np.testing.assert_allclose(plan.weights, smooth([sigma, 1 - sigma]), rtol=1e-15)


def test_alpha_never_falls_below_eps_over_m():
    mixer = doremi(m=3, total=100, eps=0.03)
    rng = np.random.default_rng(0)
    for step in range(50):
        train = rng.choice([0.0, 1e-30, 1e30], size=3)
        mixer.observe(step, sig(step, [3, 3, 2], train, [0.0, 0.0, 0.0]))
        assert np.min(mixer.plan(step + 1).loss_weights) >= 0.01 - 1e-15


@pytest.mark.parametrize(
    "options, message",
    [
        ({"eps": 2.0}, "eps must be"),
        ({"update_every": 0}, "update_every"),
        ({"sampling": "proxy"}, "not one of"),
        ({"eta": -1.0}, "eta must be"),
    ],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        doremi(**options)
