"""DGA: update rule by hand and against a numpy re-implementation, scale invariance of the
normalised variant, distribution reweighting, a real run, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.mixers.align_fakes import AlignSignals, add_hierarchy, constant_alignments, tiny_config
from tests.mixers.fakes import make_ctx, torch_roundtrip
from tests.train.conftest import assert_resume_identical

from mixlab.errors import ConfigError
from mixlab.mixers import build_mixer
from mixlab.mixers.dga import (
    basis_counts,
    basis_distributions,
    dga_update,
    fill_unmeasured,
    normalized_alignments,
    samples_to_groups,
)
from mixlab.model import GPT, per_sample_loss
from mixlab.signals.alignment import alignments_jvp, dot, group_mean, loss_gradient
from mixlab.train.loop import Trainer, train

# ---------------------------------------------------------------------------------------------
# Pure rules.


def test_normalized_alignments_by_hand():
    a = np.array([2.0, np.nan, -1.0, 0.5])
    np.testing.assert_array_equal(normalized_alignments(a, 4.0, "target"), [0.5, np.nan, -0.25, 0.125])
    np.testing.assert_array_equal(normalized_alignments(a, 4.0, "max_abs"), [1.0, np.nan, -0.5, 0.25])
    np.testing.assert_array_equal(normalized_alignments(a, 4.0, "none"), a)
    # A zero target gradient carries no information: no move.
    np.testing.assert_array_equal(normalized_alignments(a, 0.0, "target"), [0.0, np.nan, 0.0, 0.0])
    np.testing.assert_array_equal(normalized_alignments(np.zeros(2), 1.0, "max_abs"), [0.0, 0.0])
    with pytest.raises(ConfigError, match="normalize"):
        normalized_alignments(a, 1.0, "l2")


def test_fill_unmeasured_uses_the_weighted_mean():
    filled = fill_unmeasured(np.array([1.0, np.nan, 4.0]), np.array([0.5, 0.3, 0.2]))
    np.testing.assert_allclose(filled, [1.0, (0.5 * 1 + 0.2 * 4) / 0.7, 4.0])
    np.testing.assert_array_equal(fill_unmeasured(np.array([np.nan, np.nan]), np.ones(2)), [0.0, 0.0])


def test_dga_update_by_hand():
    w0 = np.array([0.5, 0.25, 0.25])
    z0 = np.log(w0)
    a_hat = np.array([1.0, 0.0, -1.0])
    z, w = dga_update(z0, a_hat, eta=0.5, ema=0.0, floor=0.0)
    expect = w0 * np.exp(0.5 * a_hat)
    expect /= expect.sum()
    np.testing.assert_allclose(w, expect, rtol=1e-12)
    assert z.max() == 0.0  # shifted log weights
    # Aligned domains go up, anti-aligned go down.
    assert w[0] > w0[0] and w[2] < w0[2]
    # EMA: the sampled weights move (1 - β) of the way to the mirror iterate.
    _, w_ema = dga_update(z0, a_hat, eta=0.5, ema=0.75, floor=0.0)
    np.testing.assert_allclose(w_ema, 0.75 * w0 + 0.25 * expect, rtol=1e-12)
    # ... and the next step starts from the smoothed weights, not from the plain iterate.
    z_ema, w_ema = dga_update(z0, a_hat, eta=0.5, ema=0.75, floor=0.0)
    _, w_ema2 = dga_update(z_ema, a_hat, eta=0.5, ema=0.75, floor=0.0)
    step2 = w_ema * np.exp(0.5 * a_hat)
    np.testing.assert_allclose(w_ema2, 0.75 * w_ema + 0.25 * step2 / step2.sum(), rtol=1e-12)
    # Floor: the smallest weight is lifted to the floor by mixing with uniform.
    _, w_floor = dga_update(z0, np.array([0.0, 0.0, -20.0]), eta=1.0, ema=0.0, floor=0.1)
    assert w_floor.min() == pytest.approx(0.1) and w_floor.sum() == pytest.approx(1.0)
    # An unmeasured domain keeps its share relative to the average measured one.
    _, w1 = dga_update(z0, np.array([1.0, np.nan, 1.0]), eta=1.0, ema=0.0, floor=0.0)
    np.testing.assert_allclose(w1, w0, rtol=1e-12)


def _reference_dga(alignments: np.ndarray, eta: float, ema: float, floor: float) -> np.ndarray:
    """[T, k] sampled weights after each of T mirror steps, re-implemented from DESIGN.md (DGA)
    without mixlab: α̂ = normalise(α ⊙ exp(η a)); α ← β α + (1 - β) α̂ (the EMA acts on the
    unfloored iterate, and the next step starts from it); sampled = α mixed with uniform just
    enough that min = floor (λ = (floor - min α) / (1/k - min α))."""
    k = alignments.shape[1]
    alpha = np.full(k, 1.0 / k)
    out = []
    for a in alignments:
        hat = alpha * np.exp(eta * a)
        hat = hat / hat.sum()
        alpha = ema * alpha + (1.0 - ema) * hat
        lo = alpha.min()
        lam = 0.0 if lo >= floor else (floor - lo) / (1.0 / k - lo)
        out.append((1.0 - lam) * alpha + lam / k)
    return np.asarray(out)


# Alignments for 6 updates: domain 0 aligned, domain 2 anti-aligned hard enough to sink below
# the floor, signs flipping for domain 1 (so the floor is active in later steps and the EMA
# state matters).
_ALIGNMENTS = np.array([
    [0.8, 0.1, -1.5], [0.6, -0.4, -2.0], [0.9, 0.3, -1.0],
    [0.2, -0.6, -2.5], [0.7, 0.5, -1.8], [0.4, -0.2, -2.2],
])


def _drive(mixer, alignments: np.ndarray, sq: float) -> np.ndarray:
    """[T, k] the mixer's plan after each update (update_every = 1), fed the given per-domain
    alignments (every sample of domain i has alignment a[i]) with <g_S, g_S> = ``sq``."""
    out = []
    for step, a in enumerate(alignments):
        mixer.observe(step, AlignSignals(step, measure=constant_alignments(a, sq=sq)))
        out.append(mixer.plan(step + 1).weights)
    return np.asarray(out)


def test_default_is_the_published_mirror_step_on_raw_inner_products():
    """The default options follow α ← normalise(α ⊙ exp(η a)) on the raw a_i = <g_i, g_S>,
    whatever <g_S, g_S> is (here 4: a normalised step would be 4x smaller)."""
    got = _drive(dga(update_every=1), _ALIGNMENTS, sq=4.0)
    # float64, six multiplicative steps of a few operations each: the two computations differ
    # by rounding (~1e-16 per operation), far inside 1e-12 relative.
    np.testing.assert_allclose(got, _reference_dga(_ALIGNMENTS, 1.0, 0.0, 0.0), rtol=1e-12)
    # The same with an EMA and a floor together (eta 0.7, β = 0.5, floor 0.05).
    got = _drive(dga(update_every=1, eta=0.7, ema=0.5, floor=0.05), _ALIGNMENTS, sq=4.0)
    np.testing.assert_allclose(got, _reference_dga(_ALIGNMENTS, 0.7, 0.5, 0.05), rtol=1e-12)
    assert np.all(got >= 0.05 - 1e-15) and np.allclose(got.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_ema_and_floor_act_on_the_same_unfloored_iterate():
    """With both an EMA and a floor, the EMA smooths the unfloored iterate the mirror step
    starts from, and only the sampled weights are floored (the normalised variant, so that
    this pins the EMA/floor rule alone: â = a / <g_S, g_S> with <g_S, g_S> = 1)."""
    mixer = dga(update_every=1, normalize="target", eta=1.0, ema=0.6, floor=0.1)
    got = _drive(mixer, _ALIGNMENTS, sq=1.0)
    expect = _reference_dga(_ALIGNMENTS, 1.0, 0.6, 0.1)
    # The floor is active in these steps (so feeding the floored weights back would differ).
    assert np.isclose(expect.min(axis=1), 0.1, rtol=1e-12, atol=0).sum() >= 3
    np.testing.assert_allclose(got, expect, rtol=1e-12)  # rounding only, as above
    # The state holds the unfloored iterate: softmax(logits) is below the floor for domain 2.
    alpha = np.exp(np.asarray(mixer.state_dict()["logits"]))
    alpha /= alpha.sum()
    assert alpha[2] < 0.1 and min(mixer.state_dict()["weights"]) == pytest.approx(0.1)


def _scaled_loss(c: float):
    def loss_fn(model, tokens, params=None):
        return c * per_sample_loss(model, tokens, params)

    return loss_fn


def test_update_is_invariant_to_the_loss_scale():
    """normalize = "target": multiplying the loss by c multiplies every alignment and
    <g_S, g_S> by c², so the step is the same (the raw default's step scales with c²)."""
    torch.manual_seed(0)
    model = GPT(64, 16, n_layer=2, n_head=2, d_model=32)
    gen = torch.Generator().manual_seed(1)
    target = torch.randint(0, 32, (4, 17), generator=gen)
    batch = torch.randint(0, 64, (9, 17), generator=gen)
    groups = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    results = []
    for c in (1.0, 1000.0, 1e-3):
        fn = _scaled_loss(c)
        v = loss_gradient(model, target, loss_fn=fn)
        a = group_mean(alignments_jvp(model, batch, v, loss_fn=fn).double().numpy(), groups, 3)
        a_hat = normalized_alignments(a, dot(v, v), "target")
        results.append((a, dga_update(np.zeros(3), a_hat, 2.0, 0.5, 0.0)[1]))
    (a1, w1), (a2, w2), (_, w3) = results
    np.testing.assert_allclose(a2, 1e6 * a1, rtol=1e-4)  # the raw alignments do scale
    np.testing.assert_allclose(w2, w1, rtol=1e-5)
    np.testing.assert_allclose(w3, w1, rtol=1e-5)
    assert np.abs(w1 - 1 / 3).max() > 1e-3  # and the step is not trivially zero


def test_basis_distributions_by_hand():
    parents = np.array([0, 0, 1, 1, 1, 2])
    hist = np.array([0.1, 0.3, 0.0, 0.0, 0.6, 0.0])
    bases = basis_distributions(parents, hist, "importance")
    np.testing.assert_allclose(bases, [
        [0.25, 0.75, 0, 0, 0, 0],
        [0, 0, 0, 0, 1.0, 0],
        [0, 0, 0, 0, 0, 1.0],  # no target mass under coarse cluster 2: uniform over its child
    ])
    np.testing.assert_allclose(basis_distributions(parents, None, "uniform"), [
        [0.5, 0.5, 0, 0, 0, 0], [0, 0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 0, 0, 1.0],
    ])
    with pytest.raises(ConfigError, match="coarse cluster 1 has no fine cluster"):
        basis_distributions(np.array([0, 0, 2]), None, "uniform")


def test_basis_counts_and_sample_split():
    bases = basis_distributions(np.array([0, 0, 1, 1]), None, "uniform")
    design = basis_counts(bases, 10, np.random.default_rng(0), offset=1)
    assert design.shape == (2, 4)
    np.testing.assert_array_equal(design.sum(axis=1), [5, 5])
    assert design[0, 2:].sum() == 0 and design[1, :2].sum() == 0  # drawn inside each basis
    # The samples of each cluster go to the bases in turn, in batch order.
    domains = np.array([1, 0, 1, 1, 0])
    gc = np.array([[1, 1], [1, 2]])  # basis 0: one of each; basis 1: one of cluster 0, two of 1
    np.testing.assert_array_equal(samples_to_groups(domains, gc), [0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="do not match"):
        samples_to_groups(domains, np.array([[1, 1], [1, 1]]))


# ---------------------------------------------------------------------------------------------
# The mixer with fake signals.


def dga(m: int = 3, batch: int = 8, steps: int = 100, **options):
    return build_mixer("dga", options, make_ctx(m, steps, batch))


def test_mixer_updates_every_t_steps_with_stratified_rotating_counts():
    mixer = dga(update_every=3, eta=0.5, target_windows=4)
    sig = AlignSignals(0, measure=constant_alignments(np.array([2.0, 0.0, -1.0]), sq=2.0))
    for step in range(6):
        sig.step = step
        mixer.observe(step, sig)
    assert mixer.updates == 2 and len(sig.calls) == 2  # after steps 2 and 5
    (c1, d1, m1, p1, r1), (c2, *_) = sig.calls
    assert (d1, m1, p1, r1) == ("target", "jvp", False, 0) and sig.target_windows == 4
    np.testing.assert_array_equal(c1, [3, 3, 2])  # 8 samples over 3 domains
    np.testing.assert_array_equal(c2, [3, 2, 3])  # leftovers rotate to other domains
    # Two steps of the raw a = [2, 0, -1] (the default: <g_S, g_S> = 2 plays no part) from
    # uniform, by hand: α ∝ exp(2 η a), η = 0.5.
    expect = np.exp(2 * 0.5 * np.array([2.0, 0.0, -1.0]))
    np.testing.assert_allclose(mixer.plan(6).weights, expect / expect.sum(), rtol=1e-12)
    json.dumps(mixer.report(), allow_nan=False)


def test_mixer_with_importance_init_and_bases():
    hist = np.array([0.1, 0.3, 0.0, 0.0, 0.6, 0.0])
    parents = np.array([0, 0, 1, 1, 1, 2])
    mixer = dga(m=6, basis="importance", init="importance", init_smoothing=1e-9, update_every=1)
    with pytest.raises(ConfigError, match="start"):
        mixer.plan(0)
    mixer.start(AlignSignals(-1, histogram=hist, parents=parents))
    # Importance init over importance bases: α starts at the importance-sampling mixture.
    np.testing.assert_allclose(mixer.plan(0).weights, hist, atol=1e-8)
    # One update: basis 1 (cluster 4 only) aligned, the others not.
    a = np.array([0.0, 0.0, 0.0, 0.0, 1.0, -1.0])
    sig = AlignSignals(0, measure=constant_alignments(a, sq=1.0))
    mixer.observe(0, sig)
    counts = sig.calls[0][0]
    assert counts.sum() == 8 and counts[2] == counts[3] == 0  # bases have no mass there
    w = np.array(mixer.report()["basis_weights"])
    assert w.argmax() == 1 and w[1] > 0.6
    np.testing.assert_allclose(mixer.plan(1).weights, w @ mixer.bases, rtol=1e-12)
    json.dumps(mixer.report(), allow_nan=False)


def test_state_round_trip_continues_exactly():
    a = np.array([0.3, -0.2, 0.1])
    straight, first = dga(update_every=2, ema=0.5), dga(update_every=2, ema=0.5)
    for step in range(5):
        straight.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
        first.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    resumed = dga(update_every=2, ema=0.5)
    resumed.load_state_dict(torch_roundtrip(first.state_dict()))
    for step in range(5, 9):
        straight.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
        resumed.observe(step, AlignSignals(step, measure=constant_alignments(a * (step + 1))))
    np.testing.assert_array_equal(resumed.plan(9).weights, straight.plan(9).weights)
    assert resumed.state_dict() == straight.state_dict()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"eta": -1.0}, "eta"),
        ({"ema": 1.0}, "ema"),
        ({"update_every": 0}, "update_every"),
        ({"align_samples": -1}, "align_samples"),
        ({"init_smoothing": 0.0}, "init_smoothing"),
        ({"basis": "coarse"}, "basis"),
        ({"floor": 0.5}, "above 1/k"),
        ({"histogram": {"zz": 1.0}, "init": "importance"}, "unknown domain"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        mixer = dga(**options)
        mixer.start(AlignSignals(-1, histogram=np.ones(3)))


# ---------------------------------------------------------------------------------------------
# Real runs.


@pytest.mark.parametrize(("method", "samples"), [("jvp", 0), ("fd", 5)])
def test_dga_finds_the_target_domain(tiny_data, tmp_path, method, samples):
    """Target = held-out documents of domain 'c': after a short run 'c' has the largest weight."""
    cfg = tiny_config(tiny_data, "mixer.name='dga'", "mixer.options.update_every=2",
                      f"mixer.options.method='{method}'", f"mixer.options.align_samples={samples}",
                      "target.domain='c'", "target.docs=6", "train.steps=30")
    trainer = Trainer(cfg, tmp_path / "r")
    summary = trainer.run()
    w = summary["weights_final"]
    assert max(w, key=w.get) == "c" and w["c"] > 0.5, w
    assert trainer.session.mixer.updates == 15
    # Measurements come from the auxiliary stream (one batch per update, padded when the
    # measurement is smaller); the training stream is exactly as long as the run.
    assert trainer.session.aux_sampler.step == 15 and trainer.session.sampler.step == 30


def test_dga_with_distribution_reweighting_runs(tiny_data, tmp_path):
    from mixlab.data.synthetic import make_synthetic_datadir

    data = make_synthetic_datadir(tmp_path / "data4", {"a": 20, "b": 20, "c": 20, "d": 20})
    add_hierarchy(data, [0, 0, 1, 1])
    cfg = tiny_config(data, "mixer.name='dga'", "mixer.options.update_every=2",
                      "mixer.options.basis='importance'", "target.domain='c'", "target.docs=6")
    summary = train(cfg, tmp_path / "r")
    w = summary["weights_final"]
    # Basis 1 is the target's histogram inside coarse cluster 1 (all on 'c'); 'd' is never drawn.
    assert w["d"] == 0.0 and max(w, key=w.get) == "c", w
    assert w["a"] == pytest.approx(w["b"])


def test_resume_is_bit_identical(tiny_data, tmp_path):
    extra = ("mixer.name='dga'", "mixer.options.update_every=3", "mixer.options.ema=0.5",
             "target.domain='c'", "target.docs=6", "checkpoint.every=5")
    assert_resume_identical(lambda: tiny_config(tiny_data, *extra), tmp_path, kill_after=13)


def test_bad_targets_give_clear_errors(tiny_data, tmp_path):
    # No target at all: the first update says what to set.
    cfg = tiny_config(tiny_data, "mixer.name='dga'", "mixer.options.update_every=1")
    with pytest.raises(ConfigError, match=r"set target\.path .* or target\.domain"):
        Trainer(cfg, tmp_path / "a").run()
    # A target shorter than one window.
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("w1 w2 w3")
    (tmp_path / "t" / "b.txt").write_text("w4 w5")
    with pytest.raises(ConfigError, match="fewer than one sample"):
        Trainer(tiny_config(tiny_data, "mixer.name='dga'", f"target.path='{tmp_path / 't'}'"),
                tmp_path / "b")
    # An empty target.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("   \n")
    with pytest.raises(ConfigError, match="no non-empty document"):
        Trainer(tiny_config(tiny_data, "mixer.name='dga'", f"target.path='{tmp_path / 'empty'}'"),
                tmp_path / "c")
    # Importance init for a text target needs a cluster assignment or an explicit histogram.
    (tmp_path / "txt").mkdir()
    for i in range(2):
        (tmp_path / "txt" / f"{i}.txt").write_text(" ".join(f"w{j % 60 + 1}" for j in range(60)))
    cfg = tiny_config(tiny_data, "mixer.name='dga'", "mixer.options.init='importance'",
                      f"target.path='{tmp_path / 'txt'}'")
    with pytest.raises(ConfigError, match="mixer.options.histogram"):
        Trainer(cfg, tmp_path / "d").run()
    # Distribution reweighting on a data dir without a hierarchy.
    cfg = tiny_config(tiny_data, "mixer.name='dga'", "mixer.options.basis='uniform'",
                      "target.domain='c'", "target.docs=6")
    with pytest.raises(ConfigError, match="no cluster hierarchy"):
        Trainer(cfg, tmp_path / "e").run()
