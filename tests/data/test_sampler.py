"""MixtureSampler, closest_counts and the evaluation-subset helpers.

The ``tiny_data`` fixture has domains a, b (2,000 train tokens each) and c (500 tokens). With
seq_len 7 a window is 8 tokens, so a and b have 250 windows and c has 62.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import zlib

import numpy as np
import pytest
import torch

from mixlab.data import sampler as sampler_mod
from mixlab.data.format import DataDir
from mixlab.data.sampler import (
    TAG_ORDER,
    Batch,
    MixtureSampler,
    closest_counts,
    eval_batches,
    eval_windows,
)
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.errors import CheckpointError, ConfigError, DataError

SEQ = 7


@pytest.fixture
def data(tiny_data) -> DataDir:
    return DataDir.open(tiny_data)


def make(data: DataDir, **kw) -> MixtureSampler:
    args = {"split": "train", "seq_len": SEQ, "global_batch": 8, "seed": 0, **kw}
    return MixtureSampler(data, **args)


def same(x: Batch, y: Batch) -> bool:
    return (
        x.step == y.step
        and torch.equal(x.tokens, y.tokens)
        and torch.equal(x.domains, y.domains)
        and torch.equal(x.windows, y.windows)
    )


def schedule(step: int) -> dict:
    """A mixture that changes every step, with exact compositions and reuse mixed in."""
    if step % 5 == 4:
        return {"counts": [1, 2, 5]}
    if step % 7 == 6:
        return {}
    w = np.array([1.0 + step % 3, 1.0, 0.5 + (step % 4)])
    return {"weights": w / w.sum()}


# ---------------------------------------------------------------------------------------------
# Batches


def test_batch_tokens_are_the_addressed_windows(data):
    s = make(data)
    assert s.n_windows.tolist() == [250, 250, 62]
    for step in range(3):
        b = s.next_batch([0.4, 0.4, 0.2])
        assert b.step == step and s.step == step + 1
        assert b.tokens.dtype == torch.int64 and b.tokens.shape == (8, SEQ + 1)
        assert b.domains.dtype == torch.int64 and b.windows.dtype == torch.int64
        assert b.global_counts.tolist() == np.bincount(b.domains.numpy(), minlength=3).tolist()
        for row in range(8):
            split = data.split(s.domains[int(b.domains[row])], "train")
            want = split.windows(np.array([int(b.windows[row])]), SEQ + 1)[0]
            assert b.tokens[row].tolist() == want.tolist()


def test_proportions_follow_weights(data):
    # 300 batches of 64 = 19,200 i.i.d. draws: each domain's count is Binomial(N, p); a
    # correct sampler lands within 5 standard deviations (fails with probability < 1e-6).
    p = np.array([0.5, 0.3, 0.2])
    s = make(data, global_batch=64)
    total = np.zeros(3, dtype=np.int64)
    for _ in range(300):
        total += s.next_batch(p).global_counts
    n = total.sum()
    assert n == 300 * 64
    assert np.all(np.abs(total - n * p) <= 5 * np.sqrt(n * p * (1 - p))), total


def test_zero_weight_domain_is_never_drawn(data):
    s = make(data, global_batch=64)
    for w in ([0.0, 0.5, 0.5], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]):
        for _ in range(20):
            counts = s.next_batch(w).global_counts
            assert np.all(counts[np.array(w) == 0] == 0)


def test_exact_counts_are_exact_and_shuffled(data):
    s = make(data)
    orders = set()
    for _ in range(20):
        d = s.next_batch(counts=[3, 0, 5]).domains.numpy()
        assert np.bincount(d, minlength=3).tolist() == [3, 0, 5]
        orders.add(tuple(d.tolist()))
    # Shuffled within the batch: not the sorted layout every time.
    assert len(orders) > 1 and any(list(o) != sorted(o) for o in orders)


def test_weights_can_change_every_step_and_are_reused(data):
    s = make(data)
    for step in range(10):
        target = 0 if step % 2 == 0 else 2
        w = np.eye(3)[target]
        assert s.next_batch(w).domains.tolist() == [target] * 8
    s.next_batch([0.0, 1.0, 0.0])
    assert s.next_batch().domains.tolist() == [1] * 8
    # An exact composition does not replace the remembered weights.
    s.next_batch(counts=[8, 0, 0])
    assert s.next_batch().domains.tolist() == [1] * 8
    assert s.weights.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------------------------------------
# closest_counts


@pytest.mark.parametrize(
    ("weights", "batch", "want"),
    [
        ([0.545, 0.455], 8, [4, 4]),  # 4.36, 3.64 -> floors 4, 3; the one left goes to .64
        # Aioli's probe mixture, m = 7, c = 0.625, batch 8: 5.0 + six times 0.5; the three
        # samples left go to the tied halves in index order.
        ([0.625] + [0.0625] * 6, 8, [5, 1, 1, 1, 0, 0, 0]),
        ([0.0625] * 3 + [0.625] + [0.0625] * 3, 8, [1, 1, 1, 5, 0, 0, 0]),
        ([1 / 3, 1 / 3, 1 / 3], 8, [3, 3, 2]),
        ([0.29, 0.71], 100, [29, 71]),  # 0.29 * 100 = 28.999999999999996 in floats
        ([0.1, 0.2, 0.7], 10, [1, 2, 7]),
        ([0.15, 0.15, 0.7], 10, [2, 1, 7]),  # 1.5, 1.5, 7.0: the tie goes to the lower index
        ([1.0, 0.0], 5, [5, 0]),
        ([0.5, 0.5], 1, [1, 0]),
    ],
)
def test_closest_counts_exact(weights, batch, want):
    got = closest_counts(np.array(weights), batch)
    assert got.dtype == np.int64
    assert got.tolist() == want


def test_closest_counts_invariants():
    rng = np.random.default_rng(0)
    for _ in range(200):
        m, batch = int(rng.integers(1, 12)), int(rng.integers(1, 300))
        w = rng.dirichlet(np.ones(m))
        c = closest_counts(w, batch)
        assert c.sum() == batch and np.all(c >= 0)
        assert np.all(np.abs(c - w * batch) < 1)


def test_closest_counts_rejects_bad_input():
    with pytest.raises(ConfigError, match="sum to 1"):
        closest_counts([0.5, 0.4], 8)
    with pytest.raises(ConfigError, match="batch must be >= 1"):
        closest_counts([0.5, 0.5], 0)


# ---------------------------------------------------------------------------------------------
# Determinism, resume, ranks


def test_same_seed_same_stream_other_seed_other_stream(data):
    s1, s2, s3 = make(data), make(data), make(data, seed=1)
    differs = False
    for step in range(12):
        kw = schedule(step)
        b1, b2, b3 = s1.next_batch(**kw), s2.next_batch(**kw), s3.next_batch(**kw)
        assert same(b1, b2)
        differs |= not same(b1, b3)
    assert differs


def test_resume_equals_uninterrupted_stream(data):
    full = make(data)
    stream = [full.next_batch(**schedule(t)) for t in range(48)]
    first = make(data)
    for t in range(40):
        first.next_batch(**schedule(t))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make(data)
    resumed.load_state_dict(state)
    assert resumed.step == 40
    for t in range(40, 48):
        assert same(resumed.next_batch(**schedule(t)), stream[t])
    assert resumed.state_dict() == full.state_dict()
    # c (62 windows) was drawn across an epoch boundary before the checkpoint.
    assert resumed.epochs[2] > 1


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_partition_the_global_batch(data, world_size):
    one = make(data)
    ranks = [make(data, rank=r, world_size=world_size) for r in range(world_size)]
    for t in range(30):
        kw = schedule(t)
        whole = one.next_batch(**kw)
        parts = [r.next_batch(**kw) for r in ranks]
        b = 8 // world_size
        assert all(p.tokens.shape == (b, SEQ + 1) for p in parts)
        assert torch.equal(torch.cat([p.tokens for p in parts]), whole.tokens)
        assert torch.equal(torch.cat([p.domains for p in parts]), whole.domains)
        assert torch.equal(torch.cat([p.windows for p in parts]), whole.windows)
        assert all(p.global_counts.tolist() == whole.global_counts.tolist() for p in parts)
    states = [r.state_dict() for r in ranks]
    assert all(st == states[0] for st in states)
    assert {**states[0], "world_size": 1} == one.state_dict()


def test_ranks_get_disjoint_windows(data):
    # a and b have 250 windows each: 10 batches of 8 never wrap an epoch, so no window repeats.
    ranks = [make(data, rank=r, world_size=4) for r in range(4)]
    seen: set[tuple[int, int]] = set()
    for _ in range(10):
        for r in ranks:
            b = r.next_batch([0.5, 0.5, 0.0])
            seen.update(zip(b.domains.tolist(), b.windows.tolist()))
    assert len(seen) == 80


# ---------------------------------------------------------------------------------------------
# Epochs and window order


def test_epochs_and_repeats_are_counted_exactly(data):
    s = make(data, domains=["c"])
    drawn = []
    for step in range(1, 32):
        drawn += s.next_batch([1.0]).windows.tolist()
        assert s.windows_drawn.tolist() == [8 * step]
        assert s.tokens_drawn.tolist() == [8 * step * SEQ]
        assert s.epochs.tolist() == [8 * step / 62]
    assert s.epochs.tolist() == [4.0]  # 31 * 8 = 248 = 4 * 62
    chunks = [drawn[i : i + 62] for i in range(0, 248, 62)]
    crc = zlib.crc32(b"c")
    for epoch, chunk in enumerate(chunks):
        # Every window exactly once per epoch, in the documented seeded order.
        perm = np.arange(62, dtype=np.int32)
        np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([TAG_ORDER, 0, crc, epoch]))
        ).shuffle(perm)
        assert chunk == perm.tolist()
    assert len({tuple(c) for c in chunks}) == 4


def test_domain_order_does_not_depend_on_the_mixture(data):
    # Every method sees the same data order inside a domain: the windows of a that two very
    # different mixtures draw are prefixes of one sequence.
    seqs = []
    for w in ([0.9, 0.1, 0.0], [0.2, 0.3, 0.5]):
        s = make(data)
        got: list[int] = []
        for _ in range(20):
            b = s.next_batch(w)
            got += b.windows[b.domains == 0].tolist()
        seqs.append(got)
    k = min(map(len, seqs))
    assert k > 20 and seqs[0][:k] == seqs[1][:k]


def test_permutation_built_once_per_epoch(data, monkeypatch):
    calls: list[tuple[int, ...]] = []
    real = sampler_mod._generator

    def counting(*words: int) -> np.random.Generator:
        if words[0] == TAG_ORDER:
            calls.append(words)
        return real(*words)

    monkeypatch.setattr(sampler_mod, "_generator", counting)
    s = make(data, domains=["a"])
    for _ in range(100):  # 800 draws of 250 windows: epochs 0..3
        s.next_batch([1.0])
    crc = zlib.crc32(b"a")
    assert calls == [(TAG_ORDER, 0, crc, e) for e in range(4)]


# ---------------------------------------------------------------------------------------------
# Multi-shard domains


def test_multi_shard_domains_read_correctly(tmp_path):
    # 150-token shards (three 50-token documents, rolled over past 120 tokens): with 16-token
    # windows each shard holds 9 windows and its last 6 tokens are never used.
    root = make_synthetic_datadir(tmp_path / "d", {"x": 12, "y": 5}, shard_tokens=120)
    data = DataDir.open(root)
    length = 16
    table = {}
    for name in ("x", "y"):
        shards = data.manifest.domain(name).splits["train"].shards
        assert len(shards) > 1
        parts = []
        for sh in shards:
            flat = np.fromfile(root / sh.bin, dtype=data.dtype).astype(np.int64)
            parts.append(flat[: len(flat) // length * length].reshape(-1, length))
        table[name] = np.concatenate(parts)
    s = MixtureSampler(data, "train", length - 1, 6, seed=3)
    assert s.n_windows.tolist() == [36, 15]
    seen = {0: set(), 1: set()}
    for _ in range(12):
        b = s.next_batch([0.6, 0.4])
        for row, (d, w) in enumerate(zip(b.domains.tolist(), b.windows.tolist())):
            assert b.tokens[row].tolist() == table[s.domains[d]][w].tolist()
            seen[d].add(w)
    assert len(seen[0]) > 30 and len(seen[1]) == 15  # windows from every shard were read
    got = torch.cat(list(eval_batches(data, "y", "train", np.arange(15), length - 1, 4)))
    assert got.tolist() == table["y"].tolist()


# ---------------------------------------------------------------------------------------------
# Evaluation subsets


def test_eval_windows_fixed_seeded_nested(data):
    w5 = eval_windows(data, "a", "val", 5, 3, seed=0)
    n_val = data.split("a", "val").n_windows(4)  # 8 documents of 50 tokens -> 100 windows
    assert n_val == 100
    assert w5.dtype == np.int64 and w5.tolist() == sorted(set(w5.tolist()))
    assert len(w5) == 5 and w5.min() >= 0 and w5.max() < n_val
    assert w5.tolist() == eval_windows(data, "a", "val", 5, 3, seed=0).tolist()
    w30 = eval_windows(data, "a", "val", 30, 3, seed=0)
    assert set(w5.tolist()) <= set(w30.tolist()) and len(set(w30.tolist())) == 30
    assert eval_windows(data, "a", "val", 30, 3, seed=1).tolist() != w30.tolist()
    assert eval_windows(data, "b", "val", 30, 3, seed=0).tolist() != w30.tolist()
    assert eval_windows(data, "a", "val", 100, 3, seed=0).tolist() == list(range(100))
    assert eval_windows(data, "a", "val", 10**6, 3, seed=0).tolist() == list(range(100))
    assert eval_windows(data, "a", "val", 0, 3, seed=0).tolist() == []


def test_permutation_prefix_of_full_length_is_a_permutation():
    for seed in range(5):
        rng = np.random.default_rng(seed)
        p = sampler_mod._permutation_prefix(rng, 50, 50)
        assert sorted(p.tolist()) == list(range(50))


def test_eval_batches_yield_long_tensors_in_order(data):
    idx = eval_windows(data, "b", "val", 7, SEQ, seed=0)
    batches = list(eval_batches(data, "b", "val", idx, SEQ, 3))
    assert [tuple(t.shape) for t in batches] == [(3, 8), (3, 8), (1, 8)]
    assert all(t.dtype == torch.int64 for t in batches)
    want = data.split("b", "val").windows(idx, SEQ + 1)
    assert torch.cat(batches).tolist() == want.tolist()
    with pytest.raises(DataError, match="window index out of range for b/val"):
        list(eval_batches(data, "b", "val", np.array([0, 10**6]), SEQ, 3))


def test_eval_windows_bad_input(data):
    with pytest.raises(ConfigError, match="number of evaluation windows must be >= 0"):
        eval_windows(data, "a", "val", -1, SEQ, seed=0)
    with pytest.raises(DataError, match="domain 'zz' is not in this data dir; it has: a, b, c"):
        eval_windows(data, "zz", "val", 4, SEQ, seed=0)
    with pytest.raises(DataError, match="domain 'a' is too small for seq_len 500"):
        eval_windows(data, "a", "val", 4, 500, seed=0)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"domains": ["a", "zz"]}, DataError, "unknown domain 'zz'; this data dir has: a, b, c."),
        ({"domains": ["a", "a"]}, ConfigError, "domain 'a' listed more than once"),
        ({"domains": []}, ConfigError, "at least one domain"),
        ({"split": "dev"}, DataError, "domain 'a' has no 'dev' split"),
        (
            {"global_batch": 10, "world_size": 4},
            ConfigError,
            "global batch size 10 is not divisible by the world size 4",
        ),
        ({"rank": 2, "world_size": 2}, ConfigError, "rank 2 is out of range for world size 2"),
        ({"rank": -1}, ConfigError, "rank must be >= 0"),
        ({"seq_len": 0}, ConfigError, "seq_len must be >= 1"),
        ({"seed": 1.5}, ConfigError, "seed must be an integer"),
        ({"global_batch": 0}, ConfigError, "global batch size must be >= 1"),
    ],
)
def test_bad_construction(data, kw, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make(data, **kw)


def test_domain_too_small_for_seq_len(data):
    # c has 500 train tokens: no 601-token window fits; a (2,000 tokens) still has 3.
    with pytest.raises(DataError) as exc:
        make(data, seq_len=600, domains=["a", "c"])
    assert str(exc.value).startswith(
        "domain 'c' is too small for seq_len 600: its 'train' split has 500 tokens, and one "
        "window needs seq_len + 1 = 601 tokens inside one shard."
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"weights": [0.5, 0.6, -0.1]}, "weights must be non-negative; negative for domain c"),
        ({"weights": [0.5, float("nan"), 0.5]}, "weights contain NaN or infinity (domain b)"),
        ({"weights": [float("inf"), 0.0, 0.0]}, "weights contain NaN or infinity (domain a)"),
        ({"weights": [0.5, 0.3, 0.1]}, "weights must sum to 1 (within 1e-06); they sum to 0.9."),
        ({"weights": [0.5, 0.5]}, "weights have 2 entries; expected 3, one per domain (a, b, c)."),
        ({"weights": [[0.5, 0.5, 0.0]]}, "weights must be a non-empty vector, got shape (1, 3)"),
        ({"counts": [4, 5, -1]}, "counts must be non-negative: [4, 5, -1]"),
        ({"counts": [4, 2.5, 1.5]}, "counts must be integers: [4.0, 2.5, 1.5]"),
        ({"counts": [4, 2, 1]}, "counts sum to 7; they must sum to the global batch size 8."),
        ({"counts": [4, 4]}, "counts must have 3 entries, one per domain (a, b, c)"),
        (
            {"weights": [1, 0, 0], "counts": [8, 0, 0]},
            "pass weights or counts to next_batch, not both.",
        ),
        ({}, "next_batch needs weights (or counts) on its first call"),
    ],
)
def test_bad_next_batch(data, kw, message):
    s = make(data)
    with pytest.raises(ConfigError) as exc:
        s.next_batch(**kw)
    assert message in str(exc.value)
    # A refused call changes nothing.
    assert s.step == 0 and s.windows_drawn.tolist() == [0, 0, 0] and s.weights is None


def test_weights_within_tolerance_are_accepted(data):
    s = make(data)
    s.next_batch([0.5, 0.5, 5e-7])
    assert s.weights.sum() == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ConfigError, match="sum to 1"):
        s.next_batch([0.5, 0.5, 2e-6])
    s.next_batch(counts=np.array([2.0, 6.0, 0.0]))  # integral floats are counts too


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"seq_len": 5}, "seq_len: 7 in the checkpoint, 5 here"),
        ({"global_batch": 16}, "global_batch: 8 in the checkpoint, 16 here"),
        ({"seed": 9}, "seed: 0 in the checkpoint, 9 here"),
        ({"domains": ["a", "b"]}, "domains: ['a', 'b', 'c'] in the checkpoint, ['a', 'b'] here"),
        ({"split": "val"}, "split: 'train' in the checkpoint, 'val' here"),
        (
            {"world_size": 2},
            "world size 1, this run has 2; resuming on a different number of ranks is not supported",
        ),
    ],
)
def test_load_state_from_another_setup_is_refused(data, kw, message):
    src = make(data)
    src.next_batch([0.3, 0.3, 0.4])
    dst = make(data, **kw)
    with pytest.raises(CheckpointError) as exc:
        dst.load_state_dict(src.state_dict())
    assert message in str(exc.value)
    assert dst.step == 0


def test_load_state_damaged(data):
    s = make(data)
    state = s.state_dict()
    with pytest.raises(CheckpointError, match=r"the data dir changed.*n_windows: \[250, 250, 61\]"):
        s.load_state_dict({**state, "n_windows": [250, 250, 61]})
    with pytest.raises(CheckpointError, match="missing drawn"):
        s.load_state_dict({k: v for k, v in state.items() if k != "drawn"})
    with pytest.raises(CheckpointError, match="invalid window counts"):
        s.load_state_dict({**state, "drawn": [1, -2, 3]})
    with pytest.raises(CheckpointError, match="invalid step"):
        s.load_state_dict({**state, "step": -1})
    with pytest.raises(CheckpointError, match="weights must sum to 1"):
        s.load_state_dict({**state, "weights": [0.1, 0.1, 0.1]})
    with pytest.raises(CheckpointError, match="version 99"):
        s.load_state_dict({**state, "version": 99})


def test_copies_and_pickles_continue_the_stream_without_copying_shards(data):
    s = make(data)
    s.next_batch([0.3, 0.3, 0.4])
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert all(v is None for v in clone._reader._views)
        assert same(clone.next_batch(), make_after_one(data))


def make_after_one(data: DataDir) -> Batch:
    s = make(data)
    s.next_batch([0.3, 0.3, 0.4])
    return s.next_batch()
