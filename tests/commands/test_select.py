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
