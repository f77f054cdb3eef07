"""``mixlab select`` on a synthetic data dir: the selection is the target's domain, the output
is a data dir that trains, a rerun is a no-op, and bad input is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.train.conftest import tiny_overrides

from mixlab.cli import main
from mixlab.data.format import DataDir
from mixlab.data.synthetic import make_synthetic_datadir
from mixlab.errors import ConfigError, DataError
from mixlab.offline.select import SelectConfig, select
from mixlab.train.config import load_config
from mixlab.train.loop import train


@pytest.fixture
def pool(tmp_path):
    return make_synthetic_datadir(tmp_path / "pool", {"a": 40, "b": 40, "c": 10}, vocab_size=64)


def test_select_keeps_the_target_domain_and_trains(pool, tmp_path, capsys):
    out = tmp_path / "sel"
    args = ["select", "--data", str(pool), "--target", "domain:a", "--fraction", "0.3",
            "--out", str(out), "--chunk-tokens", "0", "--min-tokens", "17"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "kept 27 of 90 pieces" in printed
    data = DataDir.open(out)
    info = data.manifest.extra["dsir"]
    assert info["pieces_per_domain"] == {"a": 27, "b": 0, "c": 0}
    assert data.domains == ["a"] and info["dropped_domains"] == ["b", "c"]
    # The train split holds exactly the chosen documents; val and test are copied unchanged.
    src = DataDir.open(pool)
    table = np.load(out / info["selected"])
    for j, (dom, doc, _, _) in enumerate(table.tolist()):
        assert dom == 0
        np.testing.assert_array_equal(
            data.split("a", "train").document(j), src.split("a", "train").document(doc)
        )
    for s in ("val", "test"):
        assert data.split("a", s).n_tokens == src.split("a", s).n_tokens
    assert (data.root / "tokenizer.json").read_bytes() == (pool / "tokenizer.json").read_bytes()
    # Every other command accepts it: a tiny training run.
    summary = train(load_config(None, tiny_overrides(out, ["train.steps=4"])), tmp_path / "run")
    assert np.isfinite(summary["test"]["avg_ppl"])
    # Same input and options: nothing to do.
    before = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_select_from_text_target_with_pieces(pool, tmp_path):
    # Domain b's tokens are w22..w42 (the synthetic bands): a text target in b's band.
    target = tmp_path / "target.txt"
    target.write_text(" ".join(f"w{22 + (i % 21)}" for i in range(200)))
    data = select(SelectConfig(data=str(pool), target=str(target), fraction=0.25,
                               out=str(tmp_path / "sel"), chunk_tokens=16, min_tokens=17))  # fmt: skip
    info = data.manifest.extra["dsir"]
    kept = info["pieces_per_domain"]
    assert kept["b"] == info["selected_pieces"] and data.domains == ["b"]
    manifest = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert manifest["command"].startswith("mixlab select --data")


def test_bad_input(pool, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        SelectConfig(data=str(pool), target="domain:a", fraction=1.5, out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="does not exist"):
        select(SelectConfig(data=str(pool), target=str(tmp_path / "nope"), out=str(tmp_path / "o")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no document"):
        select(SelectConfig(data=str(pool), target=str(empty), out=str(tmp_path / "o")))
    with pytest.raises(DataError, match="no domain keeps"):
        select(SelectConfig(data=str(pool), target="domain:a", fraction=0.01, out=str(tmp_path / "o")))
    assert main(["select", "--data", str(pool), "--target", "domain:a", "--fraction", "0",
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err


# --- per-domain mode ------------------------------------------------------------------------

BAND = 21


def _doc(rng: np.random.Generator, k: int, good: bool, length: int = 49) -> np.ndarray:
    """A document of domain k (tokens 1 + 21k .. 21k + 21): 'good' follows the domain's successor
    rule (target-like), otherwise the same tokens in random order (corrupted, unlike)."""
    if good:
        seq = np.empty(length, dtype=np.int64)
        seq[0] = rng.integers(BAND)
        for t in range(1, length):
            seq[t] = (seq[t - 1] + 1 + k) % BAND if rng.random() < 0.8 else rng.integers(BAND)
    else:
        seq = rng.integers(0, BAND, size=length)
    return np.append(1 + k * BAND + seq, 0)


def _write_datadir(root, domains: dict[str, dict[str, list[np.ndarray]]]):
    import hashlib

    from mixlab.data.format import DomainInfo, Manifest, ShardWriter, write_json_atomic
    from mixlab.data.synthetic import word_level_tokenizer_json

    root.mkdir(parents=True)
    infos = []
    for name, splits in domains.items():
        done = {}
        for s in ("train", "val", "test"):
            w = ShardWriter(root, name, s, np.dtype(np.uint16))
            for d in splits.get(s, []):
                w.add(d)
            done[s] = w.close()
        infos.append(DomainInfo(name=name, splits=done, source="test"))
    tok = word_level_tokenizer_json(64)
    (root / "tokenizer.json").write_text(tok)
    manifest = Manifest(domains=infos, vocab_size=64, eos_id=0, dtype="uint16",
                        tokenizer_sha256=hashlib.sha256(tok.encode()).hexdigest(),
                        created_by="test", source="test")  # fmt: skip
    write_json_atomic(root / "manifest.json", manifest.to_json())
    return root


@pytest.fixture
def mixed(tmp_path):
    """A pool of domains a, b, c, each 60 train documents: even ones target-like, odd ones not
    (val/test: target-like); and a target data dir with 20 target-like documents of a, 1 of b,
    none of c."""
    rng = np.random.default_rng(0)
    pool = {
        name: {
            "train": [_doc(rng, k, good=j % 2 == 0) for j in range(60)],
            "val": [_doc(rng, k, True) for _ in range(6)],
            "test": [_doc(rng, k, True) for _ in range(4)],
        }
        for k, name in enumerate("abc")
    }
    target = {"a": {"train": [_doc(rng, 0, True) for _ in range(20)]},
              "b": {"train": [_doc(rng, 1, True)]}}  # fmt: skip
    return _write_datadir(tmp_path / "pool", pool), _write_datadir(tmp_path / "target", target)


def _good_share(out) -> dict[int, float]:
    table = np.load(out / "dsir" / "selected.npy")
    return {d: float(np.mean(table[table[:, 0] == d, 1] % 2 == 0)) for d in np.unique(table[:, 0])}


def _cfg(pool, target, out, **kw) -> SelectConfig:
    return SelectConfig(data=str(pool), target=str(target), out=str(out), chunk_tokens=0,
                        min_tokens=17, **{"fraction": 0.5, "per_domain": True, **kw})  # fmt: skip


def test_per_domain_keeps_the_fraction_of_each_domain_and_its_target_like_part(mixed, tmp_path):
    pool, target = mixed
    msgs: list[str] = []
    data = select(_cfg(pool, target, tmp_path / "sel", fraction=0.4), log=msgs.append)
    info = data.manifest.extra["dsir"]
    assert data.domains == ["a", "b", "c"] and info["dropped_domains"] == []
    for name, kept in info["pieces_per_domain"].items():
        assert abs(kept - 0.4 * 60) <= 1, name
    share = _good_share(tmp_path / "sel")
    assert share[0] >= 0.9 and share[1] >= 0.9  # a and b: against their own target documents
    assert info["target_docs_per_domain"] == {"a": 20, "b": 1, "c": 21}
    assert info["whole_target_domains"] == ["c"]
    assert any(m.startswith("domain(s) c: no target documents of their own") for m in msgs)
    assert not any(m.startswith("warning") for m in msgs)
    # The pool itself as the target: each domain against its own validation documents.
    select(_cfg(pool, pool, tmp_path / "self"))
    assert all(v >= 0.9 for v in _good_share(tmp_path / "self").values())
    # Validation and test are copied unchanged; the train split holds the chosen documents.
    src = DataDir.open(pool)
    table = np.load(tmp_path / "sel" / "dsir" / "selected.npy")
    rows = table[table[:, 0] == 1]
    for j, doc in enumerate(rows[:, 1].tolist()):
        np.testing.assert_array_equal(data.split("b", "train").document(j),
                                      src.split("b", "train").document(doc))  # fmt: skip
    assert data.split("c", "val").n_tokens == src.split("c", "val").n_tokens


def test_per_domain_is_deterministic_and_the_option_rebuilds(mixed, tmp_path, capsys):
    pool, target = mixed
    out = tmp_path / "sel"
    select(_cfg(pool, target, out, per_domain=False))
    pooled = np.load(out / "dsir" / "selected.npy")
    hash_pooled = DataDir.open(out).manifest.inputs_hash
    args = ["select", "--data", str(pool), "--target", str(target), "--fraction", "0.5",
            "--out", str(out), "--chunk-tokens", "0", "--min-tokens", "17", "--per-domain"]  # fmt: skip
    assert main(args) == 0  # --per-domain changes the inputs: rebuilt
    assert "(fraction 0.5 of each domain)" in capsys.readouterr().out
    data = DataDir.open(out)
    assert data.manifest.inputs_hash != hash_pooled and "--per-domain" in data.manifest.command
    first = np.load(out / "dsir" / "selected.npy")
    assert not np.array_equal(first, pooled)
    before = (out / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0  # same options: nothing to do
    assert (out / "manifest.json").stat().st_mtime_ns == before
    # The same seed elsewhere: the same pieces, the same train shards.
    select(_cfg(pool, target, tmp_path / "again"))
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "dsir" / "selected.npy"), first)
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    for rel in [r for r in files if r.name != "manifest.json"]:
        assert (tmp_path / "again" / rel).read_bytes() == (out / rel).read_bytes(), rel
    with pytest.raises(ConfigError, match="per-domain"):
        _cfg(pool, "domain:a", tmp_path / "x")


def test_pooled_selection_warns_about_a_starved_domain(mixed, tmp_path):
    pool, target = mixed
    msgs: list[str] = []
    data = select(_cfg(pool, target, tmp_path / "sel", fraction=0.68, per_domain=False),
                  log=msgs.append)  # fmt: skip
    kept = data.manifest.extra["dsir"]["pieces_per_domain"]
    # c, absent from the target, is nearly emptied (not dropped): 2 pieces of 60 at 68% overall.
    assert kept["a"] == kept["b"] == 60 and 0 < kept["c"] < 0.1 * 0.68 * 60
    assert "c" in data.domains
    warned = [m for m in msgs if m.startswith("warning")]
    assert warned == [
        f"warning: domain c keeps {kept['c'] / 60:.1%} of its train pieces ({kept['c']} of 60) "
        "at --fraction 0.68 (pooled DSIR re-weights domains; see --per-domain)"
    ]
    # Per domain, every domain keeps its share: no warning.
    msgs.clear()
    select(_cfg(pool, target, tmp_path / "per", fraction=0.68), log=msgs.append)
    assert not any(m.startswith("warning") for m in msgs)
