"""Sources read through Hugging Face ``datasets`` (issue 16): save_to_disk folders, folders of
parquet/csv/json files with a domain column or one dataset per domain, hf:NAME from the cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.train.conftest import tiny_overrides

from mixlab.data.hf_datasets import DatasetsSource, needs_datasets
from mixlab.data.prepare import PrepareConfig, prepare
from mixlab.data.sources import FolderSource, open_source
from mixlab.errors import DataError

datasets = pytest.importorskip("datasets")
pytest.importorskip("pyarrow")

WORDS = ["river", "stone", "light", "water", "green", "field", "lambda", "yield", "class"]
OPTS = {"vocab_size": 300, "val_fraction": 0.15, "test_fraction": 0.15}


def texts_of(domain: str, n: int) -> list[str]:
    """n distinct documents of at least 32 characters (prepare's default min_chars)."""
    return [
        f"{domain} record {j}: " + " ".join(WORDS[(j * 4 + i * (j + 2)) % 9] for i in range(14))
        for j in range(n)
    ]


def rows() -> list[dict]:
    """Two domains interleaved, as a corpus with a domain column usually is."""
    law, code = texts_of("law", 40), texts_of("code", 36)
    out = []
    for j in range(40):
        out.append({"text": law[j], "topic": "law", "id": j})
        if j < 36:
            out.append({"text": code[j], "topic": "code", "id": 100 + j})
    return out


def everything(_d: str) -> bool:
    return True


def data_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_shards(a: Path, b: Path) -> None:
    """Every file of two data dirs but the manifest (which names the source) byte-identical."""
    fa, fb = data_files(a), data_files(b)
    fa.pop("manifest.json"), fb.pop("manifest.json")
    assert sorted(fa) == sorted(fb) and any(k.endswith(".bin") for k in fa)
    for k in fa:
        assert fa[k] == fb[k], k


def reference_jsonl(tmp_path: Path, records: list[dict]) -> Path:
    """The same records as one .jsonl file, read by the plain reader (the reference output)."""
    path = tmp_path / "reference.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trains(data_dir: Path, run: Path) -> dict:
    """A few steps of mixlab's loop on the data dir; the summary."""
    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    extra = ["train.steps=6", "eval.every=3"]
    summary = train(load_config(None, tiny_overrides(data_dir, extra)), run)
    assert summary["steps"] == 6
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    assert losses and all(math.isfinite(v) for v in losses)
    # Learned something: below the loss of a uniform guess over the vocabulary, ln(300) = 5.70
    # (an untrained model sits near it; 6 steps at lr 3e-3 bring the test loss to about 5.1).
    assert summary["test"]["avg_loss"] < math.log(OPTS["vocab_size"])
    return summary


def test_save_to_disk_folder_with_domain_column_prepares_and_trains(tmp_path):
    records = rows()
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(records).save_to_disk(str(saved))
    assert needs_datasets(saved)
    src = open_source(saved, domain_column="topic")
    assert isinstance(src, DatasetsSource) and src.domains is None
    docs = list(src.documents(everything))
    assert [(d.domain, d.text) for d in docs] == [(r["topic"], r["text"]) for r in records]
    # The consumer's wants() filters domains as the plain readers do.
    assert [d.text for d in src.documents(lambda d: d == "code")] == texts_of("code", 36)

    out = tmp_path / "d"
    data = prepare(PrepareConfig(source=str(saved), out=str(out), domain_column="topic", **OPTS))
    assert data.domains == ["code", "law"]
    ref = reference_jsonl(tmp_path, records)
    prepare(
        PrepareConfig(source=str(ref), out=str(tmp_path / "ref"), domain_column="topic", **OPTS)
    )
    assert_same_shards(out, tmp_path / "ref")
    trains(out, tmp_path / "run")


def test_parquet_folder_with_domain_column_prepares_and_trains(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = rows()
    folder = tmp_path / "pq"
    folder.mkdir()
    # Three files, several row groups: rows come in file-name order, then row order.
    for i, chunk in enumerate((records[:30], records[30:31], records[31:])):
        pq.write_table(
            pa.Table.from_pylist(chunk), folder / f"part-{i:02d}.parquet", row_group_size=7
        )
    (folder / "README.md").write_text("about the data", encoding="utf-8")
    assert needs_datasets(folder)
    src = open_source(folder, domain_column="topic")
    assert isinstance(src, DatasetsSource)
    # Streamed (bounded memory): an IterableDataset, never a table loaded whole.
    assert all(isinstance(p.load(), datasets.IterableDataset) for p in src.parts)
    out = tmp_path / "d"
    prepare(PrepareConfig(source=str(folder), out=str(out), domain_column="topic", **OPTS))
    ref = reference_jsonl(tmp_path, records)
    prepare(
        PrepareConfig(source=str(ref), out=str(tmp_path / "ref"), domain_column="topic", **OPTS)
    )
    assert_same_shards(out, tmp_path / "ref")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert any("README.md" in n for n in manifest["extra"]["notes"])
    trains(out, tmp_path / "run")


def test_one_dataset_per_domain_sub_folders(tmp_path):
    root = tmp_path / "corpus"
    law, code = texts_of("law", 20), texts_of("code", 18)
    datasets.Dataset.from_dict({"body": law}).save_to_disk(str(root / "law"))
    (root / "code").mkdir()
    (root / "code" / "a.csv").write_text(
        "body,n\n" + "".join(f'"{t}",{j}\n' for j, t in enumerate(code)), encoding="utf-8"
    )
    assert needs_datasets(root)
    src = open_source(root, text_field="body")
    assert isinstance(src, DatasetsSource) and src.domains == ["code", "law"]
    assert src.origin("law") == str(root / "law")
    got = list(src.documents(everything))
    assert [(d.domain, d.text) for d in got] == [("code", t) for t in code] + [
        ("law", t) for t in law
    ]
    # Stopping a domain early stops reading it (the byte cap of prepare).
    seen: list[str] = []
    for d in src.documents(lambda dom: dom == "law" and len(seen) < 3):
        seen.append(d.text)
    assert seen == law[:3]


def test_plain_folders_stay_with_the_plain_readers(tmp_path):
    """A domain folder of .txt/.jsonl/.parquet keeps today's reader (and today's output)."""
    root = tmp_path / "c"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("text", encoding="utf-8")
    (root / "a" / "y.csv").write_text("text\nhello\n", encoding="utf-8")  # skipped with a note
    assert not needs_datasets(root)
    assert isinstance(open_source(root), FolderSource)


def cli_error(argv: list[str], capsys) -> str:
    from mixlab.cli import main

    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and "Traceback" not in err
    assert [ln for ln in lines if "error" in ln] == lines[-1:], err
    return lines[-1]


def test_missing_text_column_and_bad_domain_are_one_line(tmp_path, capsys):
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows()).save_to_disk(str(saved))
    out = str(tmp_path / "d")
    err = cli_error(
        ["prepare", "--source", str(saved), "--out", out, "--text-field", "body"], capsys
    )
    assert err == (
        f"mixlab prepare: error: {saved} has no column 'body' (columns: text, topic, id); "
        "set --text-field."
    )
    err = cli_error(["prepare", "--source", str(saved), "--out", out], capsys)
    assert err.endswith("has no column 'domain' (columns: text, topic, id); set --domain-column.")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.csv").write_text("text,domain\nx,y\n", encoding="utf-8")
    (mixed / "b.json").write_text('{"text": "x", "domain": "y"}\n', encoding="utf-8")
    err = cli_error(["prepare", "--source", str(mixed), "--out", out], capsys)
    assert err == (
        f"mixlab prepare: error: {mixed} mixes file formats (csv, json); put one format per "
        "folder (json/jsonl, csv/tsv, parquet, arrow or txt)."
    )


def test_hub_id_not_in_the_cache_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    err = cli_error(
        ["prepare", "--source", "hf:nobody/nothing", "--out", str(tmp_path / "d")], capsys
    )
    assert err.startswith(
        "mixlab prepare: error: hf:nobody/nothing is not in the local datasets cache (offline: "
        "nothing is downloaded)"
    )


def test_without_datasets_the_error_names_the_extra(tmp_path, monkeypatch):
    import sys

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows()).save_to_disk(str(saved))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        DataError, match=r"needs the datasets package: pip install 'mixlab\[datasets\]'"
    ):
        open_source(saved, domain_column="topic")


def test_dataset_dict_splits_in_order_and_txt_files_one_document_each(tmp_path):
    """A saved DatasetDict is read split after split (as saved); beside it, a sub-folder of .txt
    files is one document per file, as the plain reader does (not one per line)."""
    root = tmp_path / "corpus"
    law = texts_of("law", 12)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": law[:8]}),
            "test": datasets.Dataset.from_dict({"text": law[8:]}),
        }
    )
    dd.save_to_disk(str(root / "law"))
    notes = [f"{t}\nsecond line of note {j}" for j, t in enumerate(texts_of("notes", 5))]
    (root / "notes").mkdir()
    for j, t in enumerate(notes):
        (root / "notes" / f"{j}.txt").write_text(t, encoding="utf-8")
    src = open_source(root)
    assert isinstance(src, DatasetsSource) and src.domains == ["law", "notes"]
    got = list(src.documents(everything))
    assert [d.text for d in got if d.domain == "law"] == law
    assert got[8].where == f"{root / 'law'}[test]:row 0"
    assert [d.text.strip() for d in got if d.domain == "notes"] == notes
