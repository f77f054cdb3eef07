"""Static baselines against hand-computed mixtures: stratified, natural, temperature, fixed.

Every expected value below is worked out by hand in the comment next to it (token counts chosen
so that the powers and shares are exact), never taken from mixlab.
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.mixers.align_fakes import tiny_config

from mixlab.errors import ConfigError
from mixlab.mixers import MIXERS, MixerContext, build_mixer
from mixlab.train.loop import train


def ctx(tokens: list[int]) -> MixerContext:
    names = ["a", "b", "c", "d"][: len(tokens)]
    return MixerContext(names, np.array(tokens, dtype=np.int64), total_steps=10, batch_size=8,
                        seq_len=16, seed=0)  # fmt: skip


def weights(name: str, tokens: list[int], **options) -> np.ndarray:
    mixer = build_mixer(name, options, ctx(tokens))
    w = mixer.plan(0).weights
    # Static: the same mixture at every step, whatever the mixer observes (it observes nothing).
    np.testing.assert_array_equal(mixer.plan(9).weights, w)
    assert MIXERS[name].dynamic is False
    return w


# Float tolerance: each expected value is one or two float64 roundings away from the exact
# fraction (a division, or exp/log of a power of two), so 4 ulps of 1.0 bounds the error.
ULPS = 4 * np.finfo(np.float64).eps


def test_stratified_is_uniform_whatever_the_tokens():
    np.testing.assert_allclose(weights("stratified", [1, 10, 10_000]), [1 / 3] * 3, atol=ULPS)
    np.testing.assert_allclose(weights("stratified", [5, 5, 5, 5]), [0.25] * 4, atol=ULPS)


def test_natural_is_the_token_share():
    # 100 : 300 : 600 of 1000 tokens.
    np.testing.assert_allclose(weights("natural", [100, 300, 600]), [0.1, 0.3, 0.6], atol=ULPS)


@pytest.mark.parametrize(
    ("tokens", "tau", "expected"),
    [
        # sqrt: 10 : 20 : 40, of 70.
        ([100, 400, 1600], 2.0, [1 / 7, 2 / 7, 4 / 7]),
        # cube root: 2 : 3 : 5, of 10.
        ([8, 27, 125], 3.0, [0.2, 0.3, 0.5]),
        # tau = 1 is natural: 100 : 300 : 600.
        ([100, 300, 600], 1.0, [0.1, 0.3, 0.6]),
        # tau = 1/2 squares: 1 : 4 : 9, of 14.
        ([1, 2, 3], 0.5, [1 / 14, 4 / 14, 9 / 14]),
    ],
)
def test_temperature_by_hand(tokens, tau, expected):
    np.testing.assert_allclose(weights("temperature", tokens, tau=tau), expected, atol=ULPS)


def test_temperature_default_is_tau_2():
    np.testing.assert_allclose(weights("temperature", [100, 400, 1600]), [1 / 7, 2 / 7, 4 / 7],
                               atol=ULPS)  # fmt: skip


def test_temperature_overflowing_power_stays_exact():
    # tau = 0.01: n^100 of 2^62 is 2^6200, far past float64's 2^1024; the ratio of the two
    # domains is (2^62 / 2^60)^100 = 2^200, so p = [1, 2^-200] / (1 + 2^-200).
    w = weights("temperature", [2**62, 2**60], tau=0.01)
    small = 2.0**-200
    np.testing.assert_allclose(w, [1 / (1 + small), small / (1 + small)], rtol=1e-12, atol=0)


def test_temperature_flattens_toward_uniform():
    # tau = 1000 on 1 : 1e6 tokens: ratio 1e6^(1/1000) = e^(6 ln 10 / 1000) = 1.01391...,
    # p = [1, r] / (1 + r): both within 0.0035 of 1/2.
    r = np.exp(6 * np.log(10) / 1000)
    np.testing.assert_allclose(weights("temperature", [1, 10**6], tau=1000.0),
                               [1 / (1 + r), r / (1 + r)], atol=ULPS)  # fmt: skip


def test_fixed_is_the_given_mixture_in_domain_order():
    # Given out of order; the plan follows the context's domain order a, b, c.
    w = weights("fixed", [1, 1, 1], weights={"c": 0.5, "a": 0.2, "b": 0.3})
    np.testing.assert_allclose(w, [0.2, 0.3, 0.5], atol=ULPS)


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"a": 0.2, "b": 0.3, "c": 0.6}, "sum to 1"),
        ({"a": 0.5, "b": 0.5}, "missing domain"),
        ({"a": 0.5, "b": 0.5, "c": 0.0, "zz": 0.0}, "unknown domain"),
        ({"a": 1.5, "b": -0.5, "c": 0.0}, "non-negative"),
    ],
)
def test_fixed_refuses_what_is_not_a_mixture(given, match):
    with pytest.raises(ConfigError, match=match):
        build_mixer("fixed", {"weights": given}, ctx([1, 1, 1]))


def test_temperature_refuses_bad_tau_and_empty_domains():
    with pytest.raises(ConfigError, match="tau must be > 0"):
        build_mixer("temperature", {"tau": 0.0}, ctx([1, 1]))
    with pytest.raises(ConfigError, match="every domain to have tokens"):
        build_mixer("temperature", {}, ctx([10, 0]))


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        # tiny_data: 40, 40 and 10 train documents of 50 tokens: 2000 : 2000 : 500 tokens.
        ("natural", [], {"a": 4 / 9, "b": 4 / 9, "c": 1 / 9}),
        # sqrt(2000) : sqrt(2000) : sqrt(500) = 2 : 2 : 1.
        ("temperature", [], {"a": 0.4, "b": 0.4, "c": 0.2}),
        ("stratified", [], {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
    ],
)
def test_real_run_uses_the_train_split_token_counts(name, extra, expected, tiny_data, tmp_path):
    """The trainer hands the mixers the *train* split's tokens (not val/test, not documents)."""
    summary = train(tiny_config(tiny_data, f"mixer.name='{name}'", "train.steps=2", *extra),
                    tmp_path / "r")  # fmt: skip
    for d, p in expected.items():
        # weights_final goes through JSON (float repr round-trips exactly) after one division.
        assert summary["weights_final"][d] == pytest.approx(p, abs=ULPS), d
