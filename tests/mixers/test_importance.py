"""Clustered importance sampling: the histogram, its checks, the static plan, a real run."""

from __future__ import annotations

import numpy as np
import pytest
from tests.mixers.align_fakes import AlignSignals, tiny_config
from tests.mixers.fakes import make_ctx, torch_roundtrip

from mixlab.errors import ConfigError
from mixlab.mixers import MIXERS, build_mixer
from mixlab.mixers.importance import histogram_from_mapping, importance_ratios, importance_weights
from mixlab.train.loop import Trainer, train


def test_histogram_and_ratios_by_hand():
    h = histogram_from_mapping({"a": 3.0, "c": 1.0}, ["a", "b", "c"], "histogram")
    np.testing.assert_array_equal(h, [3.0, 0.0, 1.0])  # a domain left out has share 0
    w = importance_weights(h, np.array([100, 100, 200]), ["a", "b", "c"])
    np.testing.assert_array_equal(w, [0.75, 0.0, 0.25])
    # w(c) = P(c | target) / P(c | generic): generic shares are 0.25, 0.25, 0.5.
    np.testing.assert_allclose(importance_ratios(w, np.array([100, 100, 200])), [3.0, 0.0, 0.5])


@pytest.mark.parametrize(
    ("hist", "tokens", "match"),
    [
        ([0.0, 0.0, 0.0], [1, 1, 1], "histogram is empty"),
        ([1.0, 0.0, 1.0], [1, 1, 0], r"cluster\(s\) \['c'\], which hold no training documents"),
        ([1.0, -1.0, 1.0], [1, 1, 1], ">= 0"),
        ([1.0, 1.0], [1, 1, 1], "2 entries for 3 domains"),
    ],
)
def test_bad_histograms(hist, tokens, match):
    with pytest.raises(ConfigError, match=match):
        importance_weights(np.array(hist), np.array(tokens), ["a", "b", "c"])


def test_unknown_domain_in_option():
    with pytest.raises(ConfigError, match="unknown domain"):
        build_mixer("importance", {"histogram": {"zz": 1.0}}, make_ctx(3))


def test_static_plan_from_option_with_floor():
    mixer = build_mixer("importance", {"histogram": {"a": 1.0}, "floor": 0.1}, make_ctx(3))
    assert MIXERS["importance"].dynamic is False
    w = mixer.plan(0).weights
    assert w.min() == pytest.approx(0.1) and w.sum() == pytest.approx(1.0)
    assert np.array_equal(mixer.plan(50).weights, w)


def test_histogram_from_the_target_and_state_round_trip():
    mixer = build_mixer("importance", {}, make_ctx(3))
    with pytest.raises(ConfigError, match="no target histogram"):
        mixer.plan(0)
    mixer.start(AlignSignals(-1, histogram=np.array([1.0, 3.0, 0.0])))
    np.testing.assert_array_equal(mixer.plan(0).weights, [0.25, 0.75, 0.0])
    resumed = build_mixer("importance", {}, make_ctx(3))
    resumed.load_state_dict(torch_roundtrip(mixer.state_dict()))
    np.testing.assert_array_equal(resumed.plan(7).weights, [0.25, 0.75, 0.0])
    # No target at all: the error says what to give.
    with pytest.raises(ConfigError, match="no target configured"):
        build_mixer("importance", {}, make_ctx(3)).start(AlignSignals(-1))


def test_real_run_samples_only_the_target_cluster(tiny_data, tmp_path):
    summary = train(tiny_config(tiny_data, "mixer.name='importance'", "target.domain='c'",
                                "target.docs=6"), tmp_path / "r")
    assert summary["weights_final"] == {"a": 0.0, "b": 0.0, "c": 1.0}
    assert summary["tokens_per_domain"]["a"] == 0


def test_text_target_without_cluster_assignment_asks_for_the_histogram(tiny_data, tmp_path):
    (tmp_path / "t").mkdir()
    for i in range(2):
        (tmp_path / "t" / f"{i}.txt").write_text(" ".join(f"w{j % 60 + 1}" for j in range(60)))
    cfg = tiny_config(tiny_data, "mixer.name='importance'", f"target.path='{tmp_path / 't'}'")
    with pytest.raises(ConfigError, match="mixer.options.histogram"):
        Trainer(cfg, tmp_path / "r").run()


def crisp_ctx(tokens):
    from mixlab.mixers import MixerContext

    return MixerContext(["a", "b", "c", "d"], np.array(tokens, dtype=np.int64), total_steps=10,
                        batch_size=8, seq_len=16, seed=0)  # fmt: skip


# One or two float64 roundings of numbers <= 5: 8 ulps of 5 bounds the error of every value.
TOL = 8 * 5 * np.finfo(np.float64).eps


def test_crisp_mixture_and_importance_ratios_by_hand():
    """Four clusters; the generic data holds 4000 : 3000 : 2000 : 1000 tokens, so
    P(c | generic) = .4 .3 .2 .1; the target's 8 documents fall 1, 1, 2, 4 in them, so
    P(c | target) = 1/8 1/8 2/8 4/8 and the CRISP weights (Grangier et al. 2024, arXiv
    2410.03735) are w(c) = P(c | target) / P(c | generic) = .3125, .41666.., 1.25, 5."""
    mixer = build_mixer("importance", {"histogram": {"a": 1, "b": 1, "c": 2, "d": 4}},
                        crisp_ctx([4000, 3000, 2000, 1000]))  # fmt: skip
    p = mixer.plan(0).weights
    np.testing.assert_allclose(p, [0.125, 0.125, 0.25, 0.5], atol=TOL)
    w = np.array(mixer.report()["importance_ratio"])
    np.testing.assert_allclose(w, [0.3125, 0.125 / 0.3, 1.25, 5.0], atol=TOL)
    # What makes the mixture CRISP: weighting generic documents by w(c) gives cluster c the mass
    # P(c | generic) w(c) = P(c | target), by hand .4 * .3125 = .125, .3 * .41666 = .125, ...
    np.testing.assert_allclose(np.array([0.4, 0.3, 0.2, 0.1]) * w, [0.125, 0.125, 0.25, 0.5],
                               atol=TOL)  # fmt: skip


def test_crisp_floor_by_hand():
    """floor 0.2 > min h = 1/8: p = (1 - λ) h + λ / 4 with λ = (0.2 - 1/8) / (1/4 - 1/8) = 0.6,
    p = 0.4 h + 0.15 = .2 .2 .25 .35; ratios p / P(c | generic) = .5 .666.. 1.25 3.5. A floor
    below min h (0.1) changes nothing."""
    ctx = crisp_ctx([4000, 3000, 2000, 1000])
    hist = {"a": 1, "b": 1, "c": 2, "d": 4}
    p = build_mixer("importance", {"histogram": hist, "floor": 0.2}, ctx)
    np.testing.assert_allclose(p.plan(0).weights, [0.2, 0.2, 0.25, 0.35], atol=TOL)
    np.testing.assert_allclose(p.report()["importance_ratio"], [0.5, 0.2 / 0.3, 1.25, 3.5],
                               atol=TOL)  # fmt: skip
    low = build_mixer("importance", {"histogram": hist, "floor": 0.1}, ctx)
    np.testing.assert_allclose(low.plan(0).weights, [0.125, 0.125, 0.25, 0.5], atol=TOL)
