"""prepare(): raw text -> data dir; splits, filtering, errors, atomicity, no-op re-runs, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mixlab.cli import main
from mixlab.data import prepare as prep
from mixlab.data.format import MANIFEST, SPLITS, TOKENIZER, DataDir
from mixlab.data.prepare import (
    PrepareConfig,
    assign_splits,
    clean_text,
    equivalent_command,
    prepare,
    split_counts,
    summary_table,
)
from mixlab.data.tokenizer import decode, sha256_file
from mixlab.errors import ConfigError, DataError

WORDS = {
    "alpha": ["river", "stone", "light", "water", "green", "field"],
    "beta": ["return", "value", "lambda", "import", "class", "yield"],
}


def doc_text(domain: str, j: int) -> str:
    words = WORDS[domain]
    body = " ".join(words[(j * 5 + i * (j + 1)) % len(words)] for i in range(12))
    return f"{domain} document {j}: {body}."


def make_corpus(root: Path, n_alpha: int = 20, n_beta: int = 12) -> dict[str, list[str]]:
    """alpha: one .txt per document; beta: one .jsonl file. Returns the texts per domain."""
    texts = {
        "alpha": [doc_text("alpha", j) for j in range(n_alpha)],
        "beta": [doc_text("beta", j) for j in range(n_beta)],
    }
    (root / "alpha").mkdir(parents=True)
    for j, t in enumerate(texts["alpha"]):
        (root / "alpha" / f"{j:03d}.txt").write_text(t, encoding="utf-8")
    (root / "beta").mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts["beta"])
    (root / "beta" / "docs.jsonl").write_text(lines, encoding="utf-8")
    return texts


def cfg_for(src: Path, out: Path, **kw) -> PrepareConfig:
    opts = {"vocab_size": 300, "val_fraction": 0.1, "test_fraction": 0.1, **kw}
    return PrepareConfig(source=str(src), out=str(out), **opts)


def split_texts(data: DataDir, domain: str) -> dict[str, list[str]]:
    tok = data.tokenizer()
    out = {}
    for s in SPLITS:
        sp = data.split(domain, s)
        docs = [sp.document(j) for j in range(sp.n_docs)]
        assert all(d[-1] == data.eos_id for d in docs)
        out[s] = [decode(tok, d) for d in docs]
    return out


def all_texts(by_split: dict[str, list[str]]) -> list[str]:
    return [t for s in SPLITS for t in by_split[s]]


@pytest.fixture
def built(tmp_path):
    src = tmp_path / "corpus"
    texts = make_corpus(src)
    out = tmp_path / "data"
    data = prepare(cfg_for(src, out))
    return src, out, texts, data


# --- pure helpers ---------------------------------------------------------------------------


def test_clean_text():
    assert clean_text("\ufeffa\r\nb\rc\x00d\x0ce\tf\x85 \n") == ("a\nb\ncde\tf", 0)
    assert clean_text("x\ud800y") == ("x\ufffdy", 1)
    assert clean_text(" \n\t ") == ("", 0)


def test_split_counts():
    assert split_counts(20, 0.05, 0.05) == (18, 1, 1)
    assert split_counts(20, 0.1, 0.1) == (16, 2, 2)
    assert split_counts(100, 0.1, 0.2) == (70, 10, 20)
    assert split_counts(3, 0.05, 0.05) == (1, 1, 1)  # the minimum of one document per split
    assert split_counts(2, 0.0, 0.0) == (2, 0, 0)
    assert split_counts(10, 0.05, 0.05, min_split_docs=3) == (4, 3, 3)
    with pytest.raises(DataError, match="domain 'x' has 2 document"):
        split_counts(2, 0.05, 0.05, domain="x")


def test_assign_splits_is_seeded_and_disjoint():
    labels = assign_splits(50, 5, 7, seed=0, domain="a")
    assert np.bincount(labels, minlength=3).tolist() == [38, 5, 7]
    assert assign_splits(50, 5, 7, seed=0, domain="a").tolist() == labels.tolist()
    assert assign_splits(50, 5, 7, seed=1, domain="a").tolist() != labels.tolist()
    assert assign_splits(50, 5, 7, seed=0, domain="b").tolist() != labels.tolist()


def test_config_validation():
    with pytest.raises(ConfigError, match="does not fit uint32"):
        PrepareConfig(vocab_size=2**32 + 1)
    with pytest.raises(ConfigError, match="at least 257"):
        PrepareConfig(vocab_size=100)
    with pytest.raises(ConfigError, match="val_fraction must be in"):
        PrepareConfig(val_fraction=1.5)
    with pytest.raises(ConfigError, match="must be below 1"):
        PrepareConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ConfigError, match=r"domain name '\.\./x' cannot be used"):
        PrepareConfig(domains=["../x"])


def test_equivalent_command():
    cfg = PrepareConfig(
        source="c", out="o", vocab_size=300, max_bytes_per_domain=1_500_000, domains=["a", "b"]
    )
    assert equivalent_command(cfg) == (
        "mixlab prepare --source c --out o --vocab-size 300 --max-mb-per-domain 1.5 --domains a,b"
    )


# --- end to end -----------------------------------------------------------------------------


def test_prepare_round_trip_and_disjoint_splits(built):
    src, out, texts, data = built
    m = data.manifest
    assert m.domain_names == ["alpha", "beta"]
    assert m.eos_id == 0 and m.dtype == "uint16" and m.vocab_size <= 300
    assert m.tokenizer_sha256 == sha256_file(out / TOKENIZER)
    assert m.source == str(src.resolve())
    assert m.command == f"mixlab prepare --source {src} --out {out} --vocab-size 300 " + (
        "--val-fraction 0.1 --test-fraction 0.1"
    )
    for domain, n, counts in [("alpha", 20, (16, 2, 2)), ("beta", 12, (10, 1, 1))]:
        info = m.domain(domain)
        assert tuple(info.splits[s].docs for s in SPLITS) == counts
        assert info.bytes == sum(len(t.encode()) for t in texts[domain])
        assert info.dropped_docs == 0 and info.replaced_chars == 0
        got = split_texts(data, domain)
        # Every document comes back exactly, in exactly one split.
        assert sorted(got["train"] + got["val"] + got["test"]) == sorted(texts[domain])
        assert len(set(got["train"]) | set(got["val"]) | set(got["test"])) == n
        tokens = [data.split(domain, s).n_tokens for s in SPLITS]
        assert tokens == [info.splits[s].tokens for s in SPLITS]
    assert not list(out.glob("_scratch"))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".data")]


def test_rerun_is_a_noop_until_inputs_change(built):
    src, out, _, _ = built
    before = (out / MANIFEST).stat().st_mtime_ns
    said: list[str] = []
    again = prepare(cfg_for(src, out), log=said.append)
    assert (out / MANIFEST).stat().st_mtime_ns == before
    assert said == [
        f"{out} is up to date (same inputs and options, hash {again.manifest.inputs_hash[:12]}); nothing to do."
    ]
    # Another seed is another data dir.
    reseeded = prepare(cfg_for(src, out, seed=1))
    assert reseeded.manifest.inputs_hash != again.manifest.inputs_hash
    # So is an edited input file.
    first = prepare(cfg_for(src, out))
    path = src / "alpha" / "000.txt"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert prepare(cfg_for(src, out)).manifest.inputs_hash != first.manifest.inputs_hash


def test_failing_prepare_leaves_existing_data_dir_intact(built, tmp_path, monkeypatch):
    src, out, _, _ = built
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (src / "gamma").mkdir()
    (src / "gamma" / "g.jsonl").write_text('{"text": "fine text that is long enough"}\n{oops\n')
    with pytest.raises(DataError, match=r"g\.jsonl:2: not valid JSON"):
        prepare(cfg_for(src, out))
    # A failure late in the pipeline (while encoding) leaves it intact too.
    (src / "gamma" / "g.jsonl").unlink()
    (src / "gamma").rmdir()
    (src / "alpha" / "new.txt").write_text(doc_text("alpha", 99), encoding="utf-8")

    def boom(*_a, **_k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep.bpe, "encode_text", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(cfg_for(src, out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus", "data"]
    DataDir.open(out)


def test_filtering_replacement_and_counts(tmp_path):
    src = tmp_path / "c"
    texts = make_corpus(src)
    (src / "alpha" / "dup1.txt").write_text(texts["alpha"][3], encoding="utf-8")
    (src / "alpha" / "dup2.txt").write_text("\r\n" + texts["alpha"][4] + "  ", encoding="utf-8")
    (src / "alpha" / "short.txt").write_text("too short", encoding="utf-8")
    (src / "alpha" / "blank.txt").write_text(" \n\x00 ", encoding="utf-8")
    (src / "beta" / "bad.txt").write_bytes(
        b"beta text with two bad bytes \xff here \xfe, long enough"
    )
    data = prepare(cfg_for(src, tmp_path / "d"))
    alpha, beta = data.manifest.domain("alpha"), data.manifest.domain("beta")
    assert alpha.dropped_docs == 4
    assert data.manifest.extra["dropped"]["alpha"] == {"empty": 1, "short": 1, "duplicate": 2}
    assert sum(alpha.splits[s].docs for s in SPLITS) == 20
    assert beta.replaced_chars == 2
    assert sum(beta.splits[s].docs for s in SPLITS) == 13
    got = split_texts(data, "beta")
    assert "beta text with two bad bytes \ufffd here \ufffd, long enough" in all_texts(got)


def test_bad_inputs(tmp_path):
    src = tmp_path / "c"
    make_corpus(src)
    with pytest.raises(DataError, match="does not exist"):
        prepare(cfg_for(tmp_path / "missing", tmp_path / "d"))
    (src / "empty").mkdir()
    with pytest.raises(DataError, match="domain 'empty' is empty"):
        prepare(cfg_for(src, tmp_path / "d"))
    (src / "empty").rmdir()
    (src / "tiny").mkdir()
    for i in range(3):
        (src / "tiny" / f"{i}.txt").write_text(f"short {i}", encoding="utf-8")
    with pytest.raises(
        DataError,
        match=r"domain 'tiny' has no document left after filtering: of 3 read, 0 were empty, "
        r"3 shorter than min_chars=32, 0 duplicates",
    ):
        prepare(cfg_for(src, tmp_path / "d"))
    with pytest.raises(DataError, match="domain 'tiny' has 3 document"):
        prepare(cfg_for(src, tmp_path / "d", min_chars=1, min_split_docs=2))
    with pytest.raises(DataError, match=r"domain\(s\) nope not found"):
        prepare(cfg_for(src, tmp_path / "d", domains=["nope"]))
    assert not (tmp_path / "d").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_data_dir(tmp_path):
    src = tmp_path / "c"
    make_corpus(src)
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete", encoding="utf-8")
    with pytest.raises(DataError, match="is not a mixlab data dir"):
        prepare(cfg_for(src, precious))
    assert (precious / "thesis.tex").read_text() == "do not delete"
    with pytest.raises(DataError, match="inside the source folder"):
        prepare(cfg_for(src, src / "prepared"))


def test_other_format_version_and_corrupt_shard_are_detected_on_open(built):
    src, out, _, _ = built
    shard = out / "shards" / "alpha" / "train-00000.bin"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 2)
    with pytest.raises(DataError, match=r"shard .*train-00000\.bin is corrupt"):
        DataDir.open(out)
    # prepare does not trust a damaged dir: it rebuilds it.
    prepare(cfg_for(src, out))
    DataDir.open(out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="written in data format version 99"):
        DataDir.open(out)
    assert prepare(cfg_for(src, out)).manifest.format_version == 1


def test_shards_roll_over_and_subset_of_domains(tmp_path):
    src = tmp_path / "c"
    texts = make_corpus(src)
    data = prepare(cfg_for(src, tmp_path / "d", shard_tokens=200, domains=["alpha"]))
    assert data.domains == ["alpha"]
    train = data.manifest.domain("alpha").splits["train"]
    assert len(train.shards) > 1
    assert all(sh.tokens >= 200 for sh in train.shards[:-1])
    assert sum(sh.tokens for sh in train.shards) == train.tokens
    assert sum(sh.docs for sh in train.shards) == train.docs == 16
    got = split_texts(data, "alpha")
    assert sorted(all_texts(got)) == sorted(texts["alpha"])


def test_given_tokenizer_is_used_and_hashed(built, tmp_path):
    src, out, _, data = built
    given = tmp_path / "tok.json"
    given.write_bytes((out / TOKENIZER).read_bytes())
    other = prepare(cfg_for(src, tmp_path / "d2", tokenizer=str(given), vocab_size=8192))
    assert other.manifest.tokenizer_sha256 == sha256_file(given)
    assert other.manifest.vocab_size == data.manifest.vocab_size
    assert other.manifest.extra["tokenizer"]["trained"] is False
    assert split_texts(other, "beta") == split_texts(data, "beta")


def test_single_file_sources(tmp_path):
    rows = [("law", doc_text("alpha", j)) for j in range(6)] + [
        ("code", doc_text("beta", j)) for j in range(5)
    ]
    jsonl = tmp_path / "all.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "kind": d}) + "\n" for d, t in rows))
    data = prepare(
        cfg_for(jsonl, tmp_path / "dj", text_field="body", domain_column="kind", val_fraction=0.2)
    )
    assert data.domains == ["code", "law"]
    assert [data.manifest.domain("law").splits[s].docs for s in SPLITS] == [4, 1, 1]
    assert data.manifest.domain("law").source == f"{jsonl.resolve()} (kind = law)"

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [t for _, t in rows], "domain": [d for d, _ in rows]})
    pq.write_table(table, tmp_path / "all.parquet", row_group_size=4)
    pdata = prepare(cfg_for(tmp_path / "all.parquet", tmp_path / "dp", val_fraction=0.2))
    assert pdata.domains == ["code", "law"]
    assert split_texts(pdata, "code") == split_texts(data, "code")


def test_summary_table(built):
    *_, data = built
    lines = summary_table(data).splitlines()
    assert lines[0].split() == [
        "domain", "docs", "train", "docs", "val", "docs", "test",
        "tokens", "train", "tokens", "val", "tokens", "test", "MB", "text", "dropped", "replaced",
    ]  # fmt: skip
    a = data.manifest.domain("alpha")
    assert lines[2].split()[:4] == ["alpha", "16", "2", "2"]
    assert lines[2].split()[4] == f"{a.splits['train'].tokens:,}"
    assert lines[3].split()[:4] == ["beta", "10", "1", "1"]
    assert lines[5].split()[:4] == ["total", "26", "3", "3"]
    assert lines[6].startswith(f"vocab {data.manifest.vocab_size} (uint16), eos id 0")


# --- CLI ------------------------------------------------------------------------------------


def test_cli_prints_table(tmp_path, capsys):
    src = tmp_path / "c"
    make_corpus(src)
    args = ["prepare", "--source", str(src), "--out", str(tmp_path / "d"), "--vocab-size", "300"]
    assert main([*args, "--val-fraction", "0.1", "--test-fraction", "0.1"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[2].split()[:4] == ["alpha", "16", "2", "2"]
    assert f"data dir: {tmp_path / 'd'}" in out
    assert "reading" in err and "training a byte-level BPE (300 ids)" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source", "{tmp}/nope"], "mixlab prepare: error: source '{tmp}/nope' does not exist"),
        (["--source", "{tmp}/c", "--val-fraction", "1.5"], "mixlab prepare: error: val_fraction must be in [0, 1), got 1.5."),
        (["--source", "{tmp}/c", "--vocab-size", "5000000000"], "mixlab prepare: error: vocab_size: vocabulary of 5000000000 ids does not fit uint32"),
    ],
)  # fmt: skip
def test_cli_user_error_is_one_line_exit_2(tmp_path, capsys, flags, message):
    make_corpus(tmp_path / "c")
    argv = ["prepare", "--out", str(tmp_path / "d"), *(f.format(tmp=tmp_path) for f in flags)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(message.format(tmp=tmp_path))
