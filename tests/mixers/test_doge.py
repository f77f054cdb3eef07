"""DoGE on the alignment engine: update rule by hand, the norm estimate, real runs, resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.mixers.align_fakes import AlignSignals, constant_alignments, tiny_config
from tests.mixers.fakes import make_ctx, torch_roundtrip
from tests.train.conftest import assert_resume_identical

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.doge import chi_mean, doge_scores, doge_update, gradient_norms
from mixlab.model import GPT
from mixlab.signals.alignment import alignments_jvp, gaussian_direction, loss_gradient, norm
from mixlab.train.loop import Trainer


def test_chi_mean():
    assert chi_mean(1) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert chi_mean(4) == pytest.approx(math.sqrt(0.5) * 0.75 * math.sqrt(math.pi), rel=1e-12)
    assert 0.99 < chi_mean(100) < 1.0


def test_gradient_norms_by_hand():
    # Two probes, three groups (group 2 empty): per-group means of the probe values.
    probe = np.array([[3.0, 1.0, 4.0], [0.0, 2.0, 2.0]])
    groups = np.array([0, 1, 1])
    got = gradient_norms(probe, groups, 3)
    c = chi_mean(2)
    np.testing.assert_allclose(got[:2], [math.sqrt((9 + 0) / 2) / c, math.sqrt((2.5**2 + 2**2) / 2) / c])
    assert np.isnan(got[2])


def test_gradient_norm_estimate_is_unbiased_on_a_real_model():
    torch.manual_seed(0)
    model = GPT(64, 16, n_layer=2, n_head=2, d_model=32)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    exact = norm(loss_gradient(model, x))
    r = 120
    probe = np.stack([alignments_jvp(model, x, gaussian_direction(model, s)).double().numpy()
                      for s in range(r)])
    est = gradient_norms(probe, np.zeros(4, dtype=np.int64), 1)[0]
    assert est == pytest.approx(exact, rel=0.2)  # std of the estimate ~ 1/sqrt(2R) = 6.5%


def test_scores_and_update_by_hand():
    s = doge_scores(np.array([2.0, -1.0, 12.0, np.nan]), mean_norm=2.0, lr=0.01, dw_min=0.0, dw_max=5.0)
    np.testing.assert_allclose(s[:3], [0.01 * 2 / (2 + 1e-6), 0.0, 0.05])  # clipped to [0, 5 lr]
    assert np.isnan(s[3])
    alpha = doge_update(np.full(3, 1 / 3), np.array([0.01, 0.0, 0.05]), mu=0.01, eps=0.0)
    e = np.exp([1.0, 0.0, 5.0])
    np.testing.assert_allclose(alpha, e / e.sum(), rtol=1e-12)
    smoothed = doge_update(np.full(3, 1 / 3), np.array([0.01, 0.0, 0.05]), mu=0.01, eps=0.3)
    np.testing.assert_allclose(smoothed, 0.7 * e / e.sum() + 0.1, rtol=1e-12)


def doge(m: int = 3, steps: int = 100, **options):
    return build_mixer("doge", options, make_ctx(m, steps, 8))


def test_mixer_update_by_hand():
    mixer = doge(update_every=2, norm_probes=2)
    # Domain alignments W = [4, 1, -2], probe values give ||ĝ_i|| = [1, 1, 1] / chi_mean(2) · c.
    probe = np.ones((2, 3)) * chi_mean(2)  # so every estimated norm is exactly 1
    sig = AlignSignals(0, measure=constant_alignments(np.array([4.0, 1.0, -2.0]), probe=probe), lr=0.002)
    mixer.observe(0, sig)
    assert sig.calls == []  # not an update step
    mixer.observe(1, sig)
    counts, direction, method, pre, probes = sig.calls[0]
    np.testing.assert_array_equal(counts, [3, 3, 2])
    assert (direction, method, pre, probes) == ("domains", "jvp", False, 2)
    scores = np.clip(0.002 * np.array([4.0, 1.0, -2.0]) / (1 + 1e-6), 0, 0.01)
    alpha = np.exp(scores / 0.01) / np.exp(scores / 0.01).sum()
    np.testing.assert_allclose(mixer.report()["alpha"], alpha, rtol=1e-12)
    # Published proxy: uniform sampling, loss weighted by α; after the run, the average α.
    plan = mixer.plan(2)
    np.testing.assert_array_equal(plan.weights, np.full(3, 1 / 3))
    np.testing.assert_allclose(plan.loss_weights, alpha, rtol=1e-12)
    np.testing.assert_allclose(mixer.plan(100).weights, alpha, rtol=1e-12)  # one update: avg = α
    json.dumps(mixer.report(), allow_nan=False)


def test_unmeasured_domain_keeps_its_score_and_target_objective():
    mixer = doge(update_every=1, objective="target", apply="sample", align_samples=5)
    first = AlignSignals(0, measure=constant_alignments(np.array([1.0, 2.0, 3.0])))
    mixer.observe(0, first)
    assert first.calls[0][1] == "target"
    np.testing.assert_array_equal(first.calls[0][0], [2, 2, 1])  # align_samples = 5
    before = np.array(mixer.state_dict()["scores"])

    def only_two(counts, direction, probes):
        res = constant_alignments(np.array([0.5, 0.5, 0.5]))(counts, direction, probes)
        keep = res.domains != 2
        return type(res)(res.values[keep], res.domains[keep], 1.0, res.probe_values[:, keep])

    mixer.observe(1, AlignSignals(1, measure=only_two))
    after = np.array(mixer.state_dict()["scores"])
    assert after[2] == before[2] and after[0] != before[0]
    np.testing.assert_array_equal(mixer.plan(2).weights, mixer.report()["alpha"])  # sample mode


@pytest.mark.parametrize(
    ("options", "match"),
    [({"mu": 0.0}, "mu"), ({"dw_min": 1.0, "dw_max": 0.5}, "dw_min"), ({"eps": 2.0}, "eps"),
     ({"norm_probes": 0}, "norm_probes"), ({"objective": "ood"}, "objective")],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        doge(**options)


def test_state_round_trip():
    a = np.array([0.3, -0.2, 0.1])
    straight, first = doge(), doge()
    for step in range(3):
        for mixer in (straight, first):
            mixer.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    resumed = doge()
    resumed.load_state_dict(torch_roundtrip(first.state_dict()))
    for step in range(3, 6):
        for mixer in (straight, resumed):
            mixer.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    assert resumed.state_dict() == straight.state_dict()


def test_target_objective_favours_the_target_domain(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "mixer.name='doge'", "mixer.options.objective='target'",
                      "mixer.options.update_every=2", "target.domain='c'", "target.docs=6",
                      "train.steps=30")
    trainer = Trainer(cfg, tmp_path / "r")
    trainer.run()
    alpha = trainer.mixer.report()["alpha"]
    assert int(np.argmax(alpha)) == 2, alpha


def test_generic_resume_is_bit_identical(tiny_data, tmp_path):
    extra = ("mixer.name='doge'", "mixer.options.update_every=3", "mixer.options.norm_probes=2",
             "checkpoint.every=5")
    full = assert_resume_identical(lambda: tiny_config(tiny_data, *extra), tmp_path, kill_after=13)
    # The generic objective moved α away from uniform, and the output is the average α.
    alpha_avg = np.array(list(full["weights_final"].values()))
    assert np.abs(alpha_avg - 1 / 3).max() > 1e-3
