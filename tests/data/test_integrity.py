"""Silent corruption (issue 15, item 5): per-shard checksums in the manifest, checked on open
and by ``mixlab verify``; counts that cannot be; data dirs written before checksums."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest

from mixlab.cli import main
from mixlab.data import format as fmt
from mixlab.data.format import MANIFEST, DataDir
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.errors import DataError

VOCAB = 64  # tiny_data's vocabulary


def manifest_of(data: Path) -> dict:
    return json.loads((data / MANIFEST).read_text())


def write_manifest(data: Path, manifest: dict) -> None:
    (data / MANIFEST).write_text(json.dumps(manifest))


def all_shards(manifest: dict) -> list[dict]:
    return [sh for d in manifest["domains"] for s in d["splits"].values() for sh in s["shards"]]


def shard(data: Path, domain: str, split: str) -> Path:
    info = next(d for d in manifest_of(data)["domains"] if d["name"] == domain)["splits"][split]
    return data / info["shards"][0]["bin"]


def nudge_token(path: Path, position: int) -> None:
    """Change one token id to another id still in the vocabulary: only a checksum sees it."""
    ids = np.fromfile(path, dtype=np.uint16)
    ids[position] = (int(ids[position]) + 1) % VOCAB
    ids.tofile(path)


def strip_checksums(data: Path) -> None:
    """Make ``data`` look like a data dir written before checksums existed (0ac5ab4)."""
    m = manifest_of(data)
    for sh in all_shards(m):
        sh.pop("sha256"), sh.pop("idx_sha256")
    write_manifest(data, m)


def test_every_shard_records_the_sha256_of_its_files(tiny_data):
    shards = all_shards(manifest_of(tiny_data))
    assert len(shards) == 9  # 3 domains x 3 splits
    for sh in shards:
        assert sh["sha256"] == hashlib.sha256((tiny_data / sh["bin"]).read_bytes()).hexdigest()
        assert sh["idx_sha256"] == hashlib.sha256((tiny_data / sh["idx"]).read_bytes()).hexdigest()


def test_flipped_bytes_are_refused_on_open_by_train_and_by_verify(tiny_data, tmp_path, capsys):
    train_shard, val_shard = shard(tiny_data, "a", "train"), shard(tiny_data, "b", "val")
    nudge_token(train_shard, 11)
    with pytest.raises(DataError, match=rf"shard {train_shard} is corrupt: its sha256"):
        DataDir.open(tiny_data)
    argv = ["train", "--out", str(tmp_path / "run"), "--set", f"data.dir='{tiny_data}'",
            "--set", "data.seq_len=16", "--set", "train.steps=2"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(train_shard) in err[0] and "re-run" in err[0]
    assert not (tmp_path / "run").exists()
    # verify: one line per damaged shard, every shard named, exit 2.
    nudge_token(val_shard, 0)
    assert main(["verify", str(tiny_data)]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 2 and str(train_shard) in lines[0] and str(val_shard) in lines[1]
    assert all(line.startswith("mixlab verify: error: shard ") for line in lines)


def test_verify_passes_a_sound_dir_and_checks_the_tokenizer(tiny_data, capsys):
    assert main(["verify", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "ok: 9 shards" in out and "9 sha256 checksums match" in out
    tok = tiny_data / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"', "'", 1))
    assert main(["verify", str(tiny_data)]) == 2
    assert f"tokenizer {tok} is corrupt" in capsys.readouterr().err


def test_damaged_offsets_are_refused(tiny_data):
    m = manifest_of(tiny_data)
    idx = tiny_data / all_shards(m)[0]["idx"]
    offsets = np.load(idx)
    offsets[1], offsets[2] = offsets[2], offsets[1]  # same shape and last entry: sizes agree
    np.save(idx, offsets)
    with pytest.raises(DataError, match=rf"offsets file {idx} is corrupt"):
        DataDir.open(tiny_data)


@pytest.mark.parametrize("level", ["split", "shard"])
def test_negative_token_counts_are_refused(tiny_data, level):
    m = manifest_of(tiny_data)
    split = m["domains"][0]["splits"]["train"]
    target = split if level == "split" else split["shards"][0]
    target["tokens"] = -target["tokens"]
    write_manifest(tiny_data, m)
    with pytest.raises(DataError, match="tokens must be a non-negative integer, got -2000") as e:
        DataDir.open(tiny_data)
    assert str(tiny_data / MANIFEST) in str(e.value)


def test_counts_that_do_not_add_up_are_refused(tiny_data):
    m = manifest_of(tiny_data)
    m["domains"][1]["splits"]["val"]["docs"] += 1
    write_manifest(tiny_data, m)
    with pytest.raises(DataError, match="split 'val': docs = 9 but its shards hold 8"):
        DataDir.open(tiny_data)


def test_a_shard_path_outside_the_data_dir_is_refused(tiny_data):
    m = manifest_of(tiny_data)
    all_shards(m)[0]["bin"] = "../elsewhere.bin"
    write_manifest(tiny_data, m)
    with pytest.raises(DataError, match="must be a path inside the data dir"):
        DataDir.open(tiny_data)


def test_data_dir_without_checksums_opens_with_a_note(tiny_data, capsys):
    strip_checksums(tiny_data)
    data = DataDir.open(tiny_data)
    assert len(data.notes) == 1 and "9 of 9 shards have no checksum" in data.notes[0]
    assert main(["verify", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert "note: " in out and "no checksum" in out and "0 sha256 checksums match" in out
    # Its token ids are still read on open: one out of the vocabulary is refused.
    path = shard(tiny_data, "c", "test")
    ids = np.fromfile(path, dtype=np.uint16)
    ids[5] = VOCAB + 6
    ids.tofile(path)
    with pytest.raises(DataError, match=rf"shard {path} holds token id {VOCAB + 6} .*vocab_size"):
        DataDir.open(tiny_data)


def test_a_large_data_dir_is_sized_on_open_and_read_by_verify(tiny_data, monkeypatch, capsys):
    """Above FULL_CHECK_BYTES, open checks sizes only (and says so); verify reads every byte;
    a token id out of range still cannot reach the model: reading windows checks it."""
    monkeypatch.setattr(fmt, "FULL_CHECK_BYTES", 0)
    path = shard(tiny_data, "a", "val")
    ids = np.fromfile(path, dtype=np.uint16)
    ids[20] = VOCAB
    ids.tofile(path)
    data = DataDir.open(tiny_data)
    assert "sizes and offsets were checked" in data.notes[0] and "mixlab verify" in data.notes[0]
    with pytest.raises(DataError, match=rf"shard {path} holds token id {VOCAB}"):
        data.split("a", "val").windows(np.arange(3), 17)
    with pytest.raises(DataError, match=rf"shard {path} holds token id {VOCAB}"):
        data.split("a", "val").document(0)
    assert main(["verify", str(tiny_data)]) == 2
    assert f"shard {path} is corrupt: its sha256" in capsys.readouterr().err


def test_a_shard_changed_after_an_open_is_caught_by_the_next_open(tiny_data):
    """Opening a data dir twice in one process reads it once (``_SCANNED``); a file written in
    between has a new mtime, so the second open reads it again."""
    DataDir.open(tiny_data)
    # mtimes come from the kernel's coarse clock (one tick: 1-10 ms); wait past one.
    time.sleep(0.05)
    path = shard(tiny_data, "b", "train")
    nudge_token(path, 30)
    with pytest.raises(DataError, match=rf"shard {path} is corrupt"):
        DataDir.open(tiny_data)


def make_corpus(root: Path) -> None:
    for name, words in {"alpha": "river stone light water", "beta": "value lambda class"}.items():
        (root / name).mkdir(parents=True)
        for j in range(20):
            text = " ".join(words.split()[(i * j + i) % len(words.split())] for i in range(15))
            (root / name / f"{j:03d}.txt").write_text(f"{name} {j}: {text}.", encoding="utf-8")


def test_prepare_rebuilds_a_damaged_dir_and_adds_checksums_to_an_old_one(tmp_path):
    """The fix each message gives (re-run prepare) works: the re-run is not a no-op."""
    make_corpus(tmp_path / "corpus")
    cfg = PrepareConfig(source=str(tmp_path / "corpus"), out=str(tmp_path / "data"),
                        vocab_size=300, val_fraction=0.1, test_fraction=0.1)  # fmt: skip
    data = prepare(cfg)
    assert all(sh.sha256 for sh in data.shards())
    path = data.root / data.shards()[0].bin
    good = path.read_bytes()
    ids = np.fromfile(path, dtype=data.dtype)
    ids[0] = (int(ids[0]) + 1) % data.vocab_size
    ids.tofile(path)
    with pytest.raises(DataError, match=f"shard {path} is corrupt.*re-run `mixlab prepare --source"):
        DataDir.open(data.root)
    assert prepare(cfg).root == data.root and path.read_bytes() == good
    strip_checksums(data.root)
    assert all(sh.sha256 for sh in prepare(cfg).shards())
