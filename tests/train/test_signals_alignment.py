"""The trainer side of the alignment engine: measurement batches, directions, probes, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tests.mixers.align_fakes import add_hierarchy, tiny_config

from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.errors import ConfigError
from mixlab.signals.alignment import (
    alignments_jvp,
    dot,
    gaussian_direction,
    group_alignments_backward,
    loss_gradient,
    precondition,
)
from mixlab.train.loop import Trainer
from mixlab.train.schedule import lr_at
from mixlab.train.signals import (
    StepSignals,
    _probe_seed,
    keep_mask,
    measurement_batches,
    target_window_subset,
)


@pytest.fixture
def trainer(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, "target.domain='c'", "target.docs=6")
    t = Trainer(cfg, tmp_path / "r")
    # A few real steps, so the optimizer has a second moment and the model has moved.
    for step in range(3):
        t.train_step(step)
    return t


def signals(trainer: Trainer, step: int = 5) -> StepSignals:
    return StepSignals(step, trainer.session, None, None, None)


def replay(trainer: Trainer, counts: np.ndarray):
    """The samples a measurement of ``counts`` will use (drawn from a copy of the stream)."""
    aux = copy.deepcopy(trainer.session.aux_sampler)
    tokens, domains = [], []
    for draw, keep in measurement_batches(counts, trainer.cfg.train.batch_size):
        batch = aux.next_batch(counts=draw)
        rows = keep_mask(batch.domains.numpy(), keep)
        tokens.append(batch.tokens[torch.from_numpy(rows)])
        domains.append(batch.domains.numpy()[rows])
    return torch.cat(tokens), np.concatenate(domains)


def test_measurement_batches_and_keep_mask():
    parts = measurement_batches(np.array([5, 0, 7, 4]), 8)
    assert [(d.tolist(), k.tolist()) for d, k in parts] == [
        ([5, 0, 3, 0], [5, 0, 3, 0]), ([0, 0, 4, 4], [0, 0, 4, 4])]
    # A total that is not a multiple of the batch: the last batch is padded, padding not kept.
    parts = measurement_batches(np.array([3, 0, 2]), 4)
    assert [(d.tolist(), k.tolist()) for d, k in parts] == [([3, 0, 1], [3, 0, 1]), ([1, 1, 2], [0, 0, 1])]
    with pytest.raises(ConfigError, match="at least one sample"):
        measurement_batches(np.zeros(3, dtype=np.int64), 8)
    np.testing.assert_array_equal(keep_mask(np.array([2, 0, 2, 2, 0]), np.array([1, 0, 2])),
                                  [True, True, True, False, False])


def test_target_alignments_are_the_engine_on_the_aux_stream(trainer):
    counts = np.array([6, 6, 4])  # two measurement batches of 8
    tokens, domains = replay(trainer, counts)
    train_step, aux_step = trainer.session.sampler.step, trainer.session.aux_sampler.step
    res = signals(trainer).sample_alignments(counts)
    assert trainer.session.sampler.step == train_step and trainer.session.aux_sampler.step == aux_step + 2
    np.testing.assert_array_equal(res.domains, domains)
    np.testing.assert_array_equal(np.bincount(res.domains, minlength=3), counts)
    v = loss_gradient(trainer.model, trainer.session.target.probe)
    np.testing.assert_allclose(res.values, alignments_jvp(trainer.model, tokens, v).double().numpy(),
                               rtol=1e-5, atol=1e-7)
    assert res.direction_sq_norm == pytest.approx(dot(v, v), rel=1e-6)
    assert res.probe_values.shape == (0, 16)
    # Finite differences on the next batches agree with the exact values there.
    tokens2, _ = replay(trainer, counts)
    fd = signals(trainer).sample_alignments(counts, method="fd").values
    exact = alignments_jvp(trainer.model, tokens2, v).double().numpy()
    assert fd @ exact / (np.linalg.norm(fd) * np.linalg.norm(exact)) > 0.99


def test_per_domain_alignment_and_zero_counts(trainer):
    counts = np.array([5, 0, 4])  # 9 samples: two measurement batches, the second padded
    tokens, domains = replay(trainer, counts)
    got = signals(trainer).alignment("target", counts)
    v = loss_gradient(trainer.model, trainer.session.target.probe)
    ref = group_alignments_backward(trainer.model, tokens, domains, 3, v)
    assert np.isnan(got[1]) and np.isnan(ref[1])
    np.testing.assert_allclose(got[[0, 2]], ref[[0, 2]], rtol=1e-4)


def test_domains_direction_is_the_sum_of_domain_gradients(trainer):
    counts = np.array([3, 3, 2])
    aux = copy.deepcopy(trainer.session.aux_sampler)
    batch_a, batch_b = aux.next_batch(counts=counts), aux.next_batch(counts=counts)
    assert counts.sum() == trainer.cfg.train.batch_size  # one whole batch each: nothing dropped
    res = signals(trainer).sample_alignments(counts, direction="domains")
    np.testing.assert_array_equal(res.domains, batch_b.domains.numpy())
    # v = Σ_j ∇ mean_{x in A_j} ℓ_x, by one backward per domain on batch A.
    v = None
    for j in range(3):
        rows = batch_a.domains == j
        g = loss_gradient(trainer.model, batch_a.tokens[rows])
        v = g if v is None else {n: v[n] + g[n] for n in v}
    ref = group_alignments_backward(trainer.model, batch_b.tokens, batch_b.domains.numpy(), 3, v)
    by_domain = np.array([res.values[res.domains == j].mean() for j in range(3)])
    np.testing.assert_allclose(by_domain, ref, rtol=1e-4)


def test_val_direction_and_preconditioning(trainer):
    counts = np.array([3, 3, 2])
    tokens, _ = replay(trainer, counts)
    res = signals(trainer).sample_alignments(counts, direction="val", precondition=True)
    windows = trainer.session.signal_set.windows
    weights = torch.cat([torch.full((windows[d].shape[0],), 1 / (3 * windows[d].shape[0]))
                         for d in trainer.domains])
    v = loss_gradient(trainer.model, torch.cat([windows[d] for d in trainer.domains]), weights)
    pv = precondition(v, trainer.optimizer, trainer.model)
    np.testing.assert_allclose(res.values, alignments_jvp(trainer.model, tokens, pv).double().numpy(),
                               rtol=1e-4, atol=1e-6)
    assert res.direction_sq_norm == pytest.approx(dot(v, pv), rel=1e-5)


def test_probes_are_seeded_gaussian_directions(trainer):
    counts = np.array([3, 3, 2])
    tokens, _ = replay(trainer, counts)
    res = signals(trainer, step=7).sample_alignments(counts, probes=2)
    assert res.probe_values.shape == (2, 8)
    for r in range(2):
        z = gaussian_direction(trainer.model, _probe_seed(trainer, 7, r))
        np.testing.assert_allclose(res.probe_values[r], alignments_jvp(trainer.model, tokens, z).double().numpy(),
                                   rtol=1e-5, atol=1e-6)
    assert _probe_seed(trainer, 7, 0) != _probe_seed(trainer, 8, 0) != _probe_seed(trainer, 7, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": np.array([0, 0, 0])}, "at least one sample"),
        ({"counts": np.array([4, 4])}, "3 non-negative integers"),
        ({"counts": np.array([4.5, 3.5, 0])}, "integers"),
        ({"counts": np.array([3, 3, 2]), "direction": "north"}, "direction 'north'"),
        ({"counts": np.array([3, 3, 2]), "method": "backward"}, "'jvp', 'fd'"),
        ({"counts": np.array([3, 3, 2]), "probes": -1}, "probes"),
    ],
)
def test_bad_requests(trainer, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        signals(trainer).sample_alignments(**kwargs)


def test_no_target(tiny_data, tmp_path):
    t = Trainer(tiny_config(tiny_data), tmp_path / "r")
    with pytest.raises(ConfigError, match="set target.path"):
        signals(t).sample_alignments(np.array([3, 3, 2]))
    with pytest.raises(ConfigError, match="target's cluster histogram"):
        signals(t).target_histogram()


def test_learning_rate_histogram_and_hierarchy(tiny_data, tmp_path):
    add_hierarchy(tiny_data, [1, 0, 1])
    t = Trainer(tiny_config(tiny_data, "target.domain='b'", "target.docs=6",
                            "data.domains=['c', 'a', 'b']"), tmp_path / "r")
    s = signals(t, step=6)
    o = t.cfg.optim
    assert s.learning_rate() == lr_at(6, o.lr, o.warmup_steps, t.cfg.train.steps, o.min_lr_ratio)
    np.testing.assert_array_equal(s.target_histogram(), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(s.cluster_parents(), [1, 1, 0])  # in the run's domain order
    plain = make_synthetic_datadir(tmp_path / "plain", {"a": 10, "b": 10})
    t2 = Trainer(tiny_config(plain), tmp_path / "r2")
    with pytest.raises(ConfigError, match="no cluster hierarchy"):
        signals(t2).cluster_parents()


def test_target_window_subsets(trainer):
    n = trainer.session.target.probe.shape[0]
    assert n > 3
    np.testing.assert_array_equal(target_window_subset(n, 0, 0, 5), np.arange(n))
    np.testing.assert_array_equal(target_window_subset(n, n + 4, 0, 5), np.arange(n))
    sub = target_window_subset(n, 3, 0, 5)
    assert sub.size == 3 and np.all(np.diff(sub) > 0)
    np.testing.assert_array_equal(sub, target_window_subset(n, 3, 0, 5))  # replayable
    assert any(not np.array_equal(sub, target_window_subset(n, 3, 0, s)) for s in range(6, 12))
    # The direction is the mean-loss gradient of exactly those windows.
    counts = np.array([3, 3, 2])
    tokens, _ = replay(trainer, counts)
    res = signals(trainer, step=5).sample_alignments(counts, target_windows=3)
    v = loss_gradient(trainer.model, trainer.session.target.probe[torch.from_numpy(sub)])
    np.testing.assert_allclose(res.values, alignments_jvp(trainer.model, tokens, v).double().numpy(),
                               rtol=1e-5, atol=1e-7)


def test_text_target_histogram_uses_the_cluster_assignment(tiny_data, tmp_path, monkeypatch):
    docs = [" ".join(f"w{1 + (i * 7 + j) % 60}" for j in range(40)) for i in range(2)]
    (tmp_path / "t").mkdir()
    for i, text in enumerate(docs):
        (tmp_path / "t" / f"{i}.txt").write_text(text)
    seen = {}

    def fake_histogram(data, texts, weight="tokens"):
        seen["texts"] = list(texts)
        return np.array([0.2, 0.3, 0.5])  # over the data dir's domains a, b, c

    monkeypatch.setattr("mixlab.data.cluster.cluster_histogram", fake_histogram)
    t = Trainer(tiny_config(tiny_data, f"target.path='{tmp_path / 't'}'", "data.domains=['c', 'a']"),
                tmp_path / "r")
    np.testing.assert_array_equal(signals(t).target_histogram(), [0.5, 0.2])  # run order c, a
    # The probe part (one of the two documents), decoded from its windows: of its 40 words + EOS,
    # two 17-token windows keep the first 34 words.
    (text,) = seen["texts"]
    assert any(text.split() == d.split()[:34] for d in docs), text


@pytest.mark.slow
@pytest.mark.parametrize("mixer", [
    ["mixer.name='dga'", "mixer.options.update_every=2", "mixer.options.align_samples=5",
     "mixer.options.target_windows=3"],
    ["mixer.name='doge'", "mixer.options.update_every=2", "mixer.options.norm_probes=2",
     "mixer.options.apply='sample'"],
])
def test_two_ranks_measure_like_one_process(tiny_data, tmp_path, mixer):
    """Under torchrun every rank measures its slice and gathers: both ranks hold the same
    weights, equal to a one-process run's up to the rounding of the measurement itself.

    The one process accumulates the ranks' two micro-batches, so both train the very same
    model, bit for bit (test_distributed.py). What differs is only how each alignment (DGA) or
    domain-gradient inner product (DoGE) is reduced: per rank, then gathered, instead of in one
    pass, i.e. float32 sums in another grouping, off by about u·Σ|terms| with u = 6e-8 and
    Σ|terms| of order 1 here. The weights are exp(η Σ_k a_k) normalised, η = 1, 12 updates: so
    |Δw| <= 12 · 6e-8 · O(1) ≈ 1e-6 whatever the CPU (2e-10 measured on AMD EPYC)."""
    from tests.train.conftest import tiny_overrides
    from tests.train.test_distributed import _run

    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    extra = [*mixer, "target.domain='c'", "target.docs=6"]
    (_, s0, mix0, _), (_, s1, mix1, _) = _run(2, tiny_data, tmp_path / "ddp", extra)
    assert mix0 == mix1 and s0["weights_final"] == s1["weights_final"]
    one = train(load_config(None, tiny_overrides(tiny_data, [*extra, "train.grad_accum=2"])),
                tmp_path / "one")
    for d in one["domains"]:
        assert s0["weights_final"][d] == pytest.approx(one["weights_final"][d], abs=1e-6)
    assert max(abs(v - 1 / 3) for v in one["weights_final"].values()) > 1e-2
