"""prepare for corpora larger than memory: workers, the memory cap, exact cuts, shards, sampler.

The pieces are tested on their own (digest set, cut places, buffer plan, ordered pool), then
end to end: the data dir is byte-for-byte the same for any number of workers and any memory
cap; shards roll over at the configured size and the sampler reads windows across them; a
prepare run on a corpus larger than its cap stays under the cap (peak resident memory of the
run and its workers, polled from /proc, minus the same run on a tiny corpus); the sampler maps
a 400 MB shard without reading it.
"""

from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mixlab.commands.prepare import add_parser, config_from_args
from mixlab.data import tokenizer as bpe
from mixlab.data.encode import EncodeJob, EncodeTask, _pieces, encode_task
from mixlab.data.format import (
    MANIFEST,
    SPLITS,
    DataDir,
    DomainInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    write_json_atomic,
)
from mixlab.data.ingest import EMPTY, SHORT, DigestSet, Spool, clean_batch
from mixlab.data.parallel import (
    BufferPlan,
    OrderedPool,
    PeakTreeMemory,
    resolve_workers,
)
from mixlab.data.prepare import PrepareConfig, equivalent_command, inputs_hash, prepare
from mixlab.data.sampler import MixtureSampler
from mixlab.data.sources import open_source
from mixlab.data.textgen import write_text_corpus
from mixlab.errors import ConfigError, DataError

LINUX = sys.platform.startswith("linux")


def tree_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def same_tree(a: Path, b: Path) -> bool:
    files = tree_files(a)
    return files == tree_files(b) and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


@pytest.fixture(scope="module")
def tok():
    rnd = random.Random(0)
    return bpe.train_bpe([_random_text(rnd, 400) for _ in range(300)], 600)


_ALPHABET = [
    *"abcdefghij ABC 0123 .,;!?'\"-_()", " ", " ", "\n", "\t", "  ", "\n\n", " \n", "'s", "'re",
    "é", "ß", "中文", "\u3000", "\u00a0", "\u2028", "🙂", "x\u0301", "٣",
]  # fmt: skip


def _random_text(rnd: random.Random, n: int) -> str:
    return "".join(rnd.choice(_ALPHABET) for _ in range(n))


# --- pieces ---------------------------------------------------------------------------------


def test_digest_set_matches_a_python_set_and_stays_compact():
    rng = np.random.default_rng(0)
    pool = [rng.bytes(16) for _ in range(30_000)]
    stream = [pool[i] for i in rng.integers(0, len(pool), 60_000)] + [bytes(16), bytes(16)]
    ds, ref = DigestSet(), set()
    for d in stream:
        assert ds.add(d) == (d not in ref)
        ref.add(d)
    assert len(ds) == len(ref)
    assert all(not ds.add(d) for d in ref)  # every key is still found after the table grew
    # 16-byte slots, load between 0.3 and 0.6 after growing: 27 to 54 bytes per digest.
    assert 16 / 0.6 <= ds.nbytes / len(ds) <= 16 / 0.3


def test_clean_batch_codes():
    out = clean_batch(([" \x00 ", "tiny", "  long enough text\r\n"], 8))
    assert out[:2] == [EMPTY, SHORT]
    data = b"long enough text"
    assert out[2] == (data, hashlib.blake2b(data, digest_size=16).digest(), 0)


def test_trained_bpe_cuts_exactly_and_others_do_not(tok, tmp_path):
    assert bpe.cuts_exactly(tok)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "prefix.json").write_text(json.dumps(spec))
    assert not bpe.cuts_exactly(bpe.load_tokenizer(tmp_path / "prefix.json"))
    spec["pre_tokenizer"]["add_prefix_space"] = False
    spec["normalizer"] = {"type": "NFKC"}
    (tmp_path / "nfkc.json").write_text(json.dumps(spec))
    assert not bpe.cuts_exactly(bpe.load_tokenizer(tmp_path / "nfkc.json"))


def test_cut_point_places():
    assert bpe.cut_point(b"ab cd", 10) == 2
    assert bpe.cut_point(b"ab cd ef", 10) == 5  # the last place within the limit
    assert bpe.cut_point(b"ab cd ef", 4) == 2
    assert bpe.cut_point(b"ab\ncd", 10) == 2
    assert bpe.cut_point(b"ab  cd", 10) is None  # two spaces: the regex keeps one with "cd"
    assert bpe.cut_point(b"ab \ncd", 10) is None
    assert bpe.cut_point(b"ab cd ", 10) == 2  # a trailing space has nothing after it
    assert bpe.cut_point("中 文".encode(), 10) == 3  # multi-byte neighbours
    assert bpe.cut_point("a\u3000 b".encode(), 10) is None  # U+3000 is whitespace
    assert bpe.cut_point("a \u3000b".encode(), 10) is None
    assert bpe.cut_point("a 中".encode()[:-1], 10) is None  # the next character is cut off
    assert bpe.cut_point(b" ab", 10) is None


def test_cutting_at_cut_points_gives_the_ids_of_the_whole(tok):
    rnd = random.Random(1)
    checked = 0
    for _ in range(300):
        text = _random_text(rnd, rnd.randint(5, 60))
        data = text.encode()
        whole = bpe.encode_text(tok, text)
        for limit in range(1, len(data)):
            p = bpe.cut_point(data, limit)
            if p is None:
                continue
            assert 1 <= p <= limit
            left, right = data[:p].decode(), data[p:].decode()
            assert bpe.encode_text(tok, left) + bpe.encode_text(tok, right) == whole
            checked += 1
    assert checked > 5000
    # Cutting anywhere else does change the ids: the test above has something to find.
    text = "ab  cd'll x"
    assert any(
        bpe.encode_text(tok, text[:p]) + bpe.encode_text(tok, text[p:])
        != bpe.encode_text(tok, text)
        for p in range(1, len(text))
    )


def test_long_documents_are_encoded_in_exact_pieces(tok, tmp_path):
    rnd = random.Random(2)
    prose = " ".join(
        rnd.choice(["river", "stone", "中文", "don't", "x,", "ok.\n"]) for _ in range(600)
    )
    docs = [prose, _random_text(rnd, 3000), "x" * 500, "short doc", _random_text(rnd, 200)]
    data = [d.encode() for d in docs]
    spool = tmp_path / "spool.txt"
    spool.write_bytes(b"".join(data))
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in data])]).astype(np.int64)
    tok.save(str(tmp_path / "tok.json"))
    path = str(tmp_path / "tok.json")
    job = EncodeJob(path, bpe.sha256_file(path), bpe.EOS_TOKEN, "uint16", 64, cut=True)
    with open(spool, "rb") as fh:
        pieces = list(_pieces(fh, int(offsets[0]), int(offsets[1]), job))
        assert "".join(pieces) == prose
        assert len(pieces) > 50 and max(len(p.encode()) for p in pieces) <= 64
        # Random text has runs without a cut place: pieces grow past 64 bytes there.
        pieces = list(_pieces(fh, int(offsets[1]), int(offsets[2]), job))
        assert "".join(pieces) == docs[1] and len(pieces) > 10
        assert list(_pieces(fh, int(offsets[2]), int(offsets[3]), job)) == ["x" * 500]
    lengths, ids = encode_task(EncodeTask(job, str(spool), offsets))
    assert ids.dtype == np.uint16
    expected = [[*bpe.encode_text(tok, d), 0] for d in docs]
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [i for e in expected for i in e]
    whole = dataclasses.replace(job, dtype="uint32", cut=False)
    _, ids32 = encode_task(EncodeTask(whole, str(spool), offsets))
    assert ids32.dtype == np.uint32 and ids32.tolist() == ids.tolist()


def test_buffer_plan():
    # Reading: half the cap over depth x 6; encoding: a quarter over depth x 6 for results,
    # a quarter over workers x 72 for pieces; clamped to [4 KB, 4 MB].
    plan = BufferPlan.from_cap(16, 2)
    assert (plan.depth, plan.read_batch_bytes, plan.encode_task_bytes, plan.piece_bytes) == (
        4, 333_333, 166_666, 27_777,
    )  # fmt: skip
    big = BufferPlan.from_cap(1024, 4)
    assert (big.depth, big.read_batch_bytes, big.encode_task_bytes, big.piece_bytes) == (
        8, 4_000_000, 4_000_000, 888_888,
    )  # fmt: skip
    inline = BufferPlan.from_cap(8, 1)
    assert (inline.depth, inline.read_batch_bytes, inline.piece_bytes) == (1, 666_666, 27_777)
    with pytest.raises(DataError, match="memory_mb must be at least 8"):
        BufferPlan.from_cap(4, 1)
    assert resolve_workers(3) == 3 and 1 <= resolve_workers(0) <= 4


def test_ordered_pool_keeps_order_bounds_reading_and_reports_errors():
    items = [(i, ([f"text number {i} " * (i % 5 + 1)], 1), 60) for i in range(12)]
    expected = [(i, clean_batch(p)) for i, p, _ in items]
    pulled = []

    def lazily():
        for item in items:
            pulled.append(item[0])
            yield item

    with OrderedPool(workers=2, depth=3, start_after_bytes=100) as pool:
        out = []
        for meta, res in pool.map(clean_batch, lazily()):
            # In flight at most `depth` tasks ahead of the one handed out.
            assert len(pulled) <= meta + 3
            out.append((meta, res))
        assert pool.started  # the first two tasks (120 bytes) ran in-process, then workers
        assert out == expected
        with pytest.raises(AttributeError):
            list(pool.map(clean_batch, [(0, ([None], 1), 10)]))  # raised in a worker
    assert not pool.started
    with OrderedPool(workers=1, depth=1) as inline:
        assert list(inline.map(clean_batch, items)) == expected and not inline.started


def test_spool_reads_a_prefix_that_samples_like_the_whole(tmp_path):
    spool = Spool(tmp_path / "s.txt")
    for doc in ["aé中" + "b" * 10, "plain", "ééééé"]:
        spool.add(doc.encode())
    spool.close()
    assert list(spool.read([2, 0, 1], max_bytes=4)) == ["éééé", "aé中bb", "plain"]
    assert list(spool.read([0, 1])) == ["aé中" + "b" * 10, "plain"]
    # balanced_sample cuts the prefix where it cuts the whole: the sample does not change.
    for budget in range(1, 9):
        for order in ([0, 1, 2], [2, 1, 0]):
            full = list(bpe.balanced_sample({"d": spool.read(order)}, budget))
            cut = list(bpe.balanced_sample({"d": spool.read(order, max_bytes=budget)}, budget))
            assert cut == full


def test_execution_options_change_neither_hash_nor_manifest(tmp_path):
    (tmp_path / "c" / "a").mkdir(parents=True)
    base = PrepareConfig(source=str(tmp_path / "c"), out="o")
    other = PrepareConfig(source=str(tmp_path / "c"), out="o", workers=3, memory_mb=64)
    src = open_source(tmp_path / "c")
    assert inputs_hash(base, src) == inputs_hash(other, src)
    assert equivalent_command(other) == equivalent_command(base)
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        PrepareConfig(workers=-1)
    with pytest.raises(ConfigError, match="memory_mb must be at least 8"):
        PrepareConfig(memory_mb=1)
    with pytest.raises(ConfigError, match="shard_tokens must be >= 0"):
        PrepareConfig(shard_tokens=-5)


def test_cli_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare", "--out", "o"])
    cfg = config_from_args(args)
    assert (cfg.workers, cfg.memory_mb, cfg.shard_tokens) == (0, 1024.0, None)
    args = parser.parse_args(
        ["prepare", "--out", "o", "--workers", "2", "--memory-mb", "16", "--shard-tokens", "0"]
    )
    cfg = config_from_args(args)
    assert (cfg.workers, cfg.memory_mb, cfg.shard_tokens) == (2, 16.0, 0)


# --- end to end -----------------------------------------------------------------------------


def _mixed_corpus(root: Path) -> None:
    """Two generated domains of ~300 KB (capped at 250 KB below) plus a third with a 60 KB
    document, duplicates and too-short documents."""
    write_text_corpus(root, 0.6, ("alpha", "beta"), seed=3)
    rnd = random.Random(4)
    words = ["river", "stone", "light", "über", "中文", "x", "don't", "42,", "ok.\n"]
    gamma = root / "gamma"
    gamma.mkdir()
    (gamma / "long.txt").write_text(" ".join(rnd.choice(words) for _ in range(12_000)))
    for i in range(30):
        (gamma / f"doc{i:02d}.txt").write_text(" ".join(rnd.choice(words) for _ in range(80)))
    (gamma / "dup.txt").write_text((gamma / "doc03.txt").read_text())
    (gamma / "short.txt").write_text("too short")


def test_output_is_byte_identical_for_any_workers_and_memory_cap(tmp_path):
    src = tmp_path / "corpus"
    _mixed_corpus(src)
    out = tmp_path / "data"
    opts = {"vocab_size": 400, "max_bytes_per_domain": 250_000, "tokenizer_sample_mb": 0.3}
    builds = {}
    for workers, memory in [(1, 8.0), (2, 8.0), (2, 1024.0)]:
        said: list[str] = []
        cfg = PrepareConfig(
            source=str(src), out=str(out), workers=workers, memory_mb=memory, **opts
        )
        data = prepare(cfg, log=said.append)
        assert f"with {workers} process(es)" in said[-1]
        os.replace(out, tmp_path / f"w{workers}-{memory:g}")
        builds[(workers, memory)] = tmp_path / f"w{workers}-{memory:g}"
    first = builds[(1, 8.0)]
    assert same_tree(first, builds[(2, 8.0)])
    assert same_tree(first, builds[(2, 1024.0)])
    # What was built: the caps stopped alpha and beta mid-stream, gamma kept its long document.
    m = data.manifest
    assert m.extra["capped"] == {"alpha": True, "beta": True, "gamma": False}
    assert m.extra["dropped"]["gamma"] == {"empty": 0, "short": 1, "duplicate": 1}
    assert "workers" not in m.extra["prepare"] and "memory_mb" not in m.extra["prepare"]
    data = DataDir.open(first)
    tok = data.tokenizer()
    long_text = (src / "gamma" / "long.txt").read_text()
    gamma = [data.split("gamma", s) for s in SPLITS]
    texts = [bpe.decode(tok, sp.document(j)) for sp in gamma for j in range(sp.n_docs)]
    assert long_text in texts
    assert sum(len(t.encode()) for t in texts) == m.domain("gamma").bytes


def test_shards_roll_over_and_the_sampler_reads_across_them(tmp_path):
    src = tmp_path / "corpus"
    write_text_corpus(src, 0.2, ("alpha", "beta"), seed=5)
    opts = {"vocab_size": 400, "tokenizer_sample_mb": 0.2}
    one = prepare(PrepareConfig(source=str(src), out=str(tmp_path / "one"), shard_tokens=0, **opts))
    many = prepare(
        PrepareConfig(source=str(src), out=str(tmp_path / "many"), shard_tokens=3000, **opts)
    )
    assert many.manifest.extra["prepare"]["shard_tokens"] == 3000
    length = 33
    for d in ("alpha", "beta"):
        for s in SPLITS:
            info = many.manifest.domain(d).splits[s]
            sp = many.split(d, s)
            assert info.tokens == one.split(d, s).n_tokens and info.docs == one.split(d, s).n_docs
            # Closed at the first document that reaches 3000 tokens, never later.
            for k, sh in enumerate(info.shards[:-1]):
                last_doc = int(np.diff(sp.offsets(k))[-1])
                assert sh.tokens >= 3000 and sh.tokens - last_doc < 3000
            # The same documents in the same order, only spread over files.
            joined = np.concatenate(
                [np.fromfile(many.root / sh.bin, dtype=np.uint16) for sh in info.shards]
            )
            assert np.array_equal(
                joined,
                np.fromfile(
                    one.root / one.manifest.domain(d).splits[s].shards[0].bin, dtype=np.uint16
                ),
            )
    train = many.manifest.domain("alpha").splits["train"]
    assert len(train.shards) >= 4
    # Expected windows: each shard cut into windows of `length`, its tail dropped.
    expected = np.concatenate([
        np.fromfile(many.root / sh.bin, dtype=np.uint16)[: sh.tokens // length * length].reshape(-1, length)
        for sh in train.shards
    ])  # fmt: skip
    n = expected.shape[0]
    assert n == sum(sh.tokens // length for sh in train.shards) < train.tokens // length + 1
    sampler = MixtureSampler(many, "train", seq_len=length - 1, global_batch=n, seed=0)
    batch = sampler.next_batch(counts=[n, 0])
    assert sorted(batch.windows.tolist()) == list(range(n))  # one epoch: every window once
    assert np.array_equal(batch.tokens.numpy(), expected[batch.windows.numpy()])
    again = sampler.next_batch(counts=[n // 2, n - n // 2])  # next epoch, across domains
    rows = again.domains.numpy() == 0
    assert np.array_equal(again.tokens.numpy()[rows], expected[again.windows.numpy()[rows]])


@pytest.mark.skipif(not LINUX, reason="RLIMIT_DATA and /proc are Linux's")
def test_sampler_maps_a_large_shard_without_reading_it(tmp_path):
    """A 400 MB shard (a sparse file) read by 50 batches under RLIMIT_DATA = current + 64 MB:
    the limit counts private writable memory (every copy, even a passing one) but not the
    read-only file mapping, so reading the shard into memory would fail with MemoryError.
    Resident file pages (the kernel maps neighbours of each page read) are page cache."""
    root = tmp_path / "data"
    tokens = 200_000_000
    rel, idx = "shards/big/train-00000.bin", "shards/big/train-00000.idx.npy"
    (root / "shards" / "big").mkdir(parents=True)
    with open(root / rel, "wb") as fh:
        fh.truncate(tokens * 2)
    np.save(root / idx, np.array([0, tokens], dtype=np.int64))
    info = SplitInfo(docs=1, tokens=tokens, shards=[ShardInfo(rel, idx, 1, tokens)])
    manifest = Manifest(
        [DomainInfo("big", {"train": info})], vocab_size=300, eos_id=0, dtype="uint16",
        tokenizer_sha256="",
    )  # fmt: skip
    write_json_atomic(root / MANIFEST, manifest.to_json())
    script = textwrap.dedent(f"""
        import resource, numpy as np, torch
        from mixlab.data.format import DataDir
        from mixlab.data.sampler import MixtureSampler
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        torch.from_numpy(np.zeros(2)).sum()  # torch's own first-use allocations
        data = DataDir.open({str(root)!r})
        limit = status("VmData") + 64 * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
        anon = status("RssAnon")
        s = MixtureSampler(data, "train", seq_len=1023, global_batch=64, seed=0)
        for _ in range(50):
            b = s.next_batch(weights=np.ones(1))
        print(s.n_windows[0], int(b.windows.max()) < s.n_windows[0], status("RssAnon") - anon)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    n_windows, in_range, anon_growth = out.stdout.split()
    assert (int(n_windows), in_range) == (tokens // 1024, "True")
    # The window permutation (4 bytes x 195,312 windows = 0.8 MB) and one batch's buffers.
    assert int(anon_growth) < 8 * 2**20


def _prepare_peak(source: Path, out: Path, tok: Path, memory_mb: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "mixlab", "prepare", "--source", str(source), "--out", str(out),
           "--tokenizer", str(tok), "--workers", "2", "--memory-mb", str(memory_mb)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakTreeMemory(proc.pid) as peak:
        _, err = proc.communicate()
    assert proc.returncode == 0, err
    return peak.bytes, err


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_prepare_on_a_corpus_larger_than_its_cap_stays_under_it(tmp_path):
    """20 MB of text, an 8 MB cap, two workers. Peak anonymous memory of the prepare process
    and its workers together (polled every 10 ms), minus the same run on a 0.6 MB corpus (same
    interpreters and workers, same tokenizer loaded, every worker busy): what the run added
    must stay under the cap. (Measured here: 2.2-3.1 MB.)"""
    text_bytes = write_text_corpus(tmp_path / "big", 20, ("alpha", "beta"), seed=6)
    write_text_corpus(tmp_path / "small", 0.6, ("alpha", "beta"), seed=7)
    with open(tmp_path / "big" / "alpha" / "part-0000.jsonl", encoding="utf-8") as fh:
        sample = [json.loads(next(fh))["text"] for _ in range(400)]
    bpe.train_bpe(sample, 8192).save(str(tmp_path / "tok.json"))
    cap_mb = 8.0
    base, _ = _prepare_peak(tmp_path / "small", tmp_path / "o1", tmp_path / "tok.json", cap_mb)
    peak, log = _prepare_peak(tmp_path / "big", tmp_path / "o2", tmp_path / "tok.json", cap_mb)
    assert "with 2 process(es)" in log
    growth = peak - base
    assert text_bytes > 2.4 * cap_mb * 1e6
    assert growth < cap_mb * 1e6, f"grew {growth / 1e6:.1f} MB over an {cap_mb} MB cap"


def test_script_without_main_guard_gets_a_clear_error(tmp_path):
    src = tmp_path / "c"
    write_text_corpus(src, 0.05, ("a",), seed=8)
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""
        from mixlab.data.prepare import PrepareConfig, prepare
        prepare(PrepareConfig(source={str(src)!r}, out={str(tmp_path / "d")!r}, vocab_size=300, workers=2))
    """)
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "prepare() was called while a worker process imported the main script" in out.stderr
    assert "a prepare worker process died" in out.stderr
    assert not (tmp_path / "d").exists()
