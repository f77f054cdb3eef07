"""User data readers: folder per domain (.txt/.jsonl/.parquet), single file with a domain column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixlab.data.sources import (
    FileSource,
    FolderSource,
    decode_bytes,
    iter_jsonl,
    open_source,
)
from mixlab.errors import DataError


def parquet() -> tuple:
    """pyarrow and pyarrow.parquet (an optional dependency: these tests skip without it)."""
    return pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")


def everything(_domain: str) -> bool:
    return True


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_decode_bytes_counts_only_new_replacements():
    assert decode_bytes("héllo".encode()) == ("héllo", 0)
    assert decode_bytes(b"ab\xffcd\xfe") == ("ab\ufffdcd\ufffd", 2)
    # A valid U+FFFD in the input is text, not a replacement.
    assert decode_bytes("x\ufffd".encode() + b"\xff") == ("x\ufffd\ufffd", 1)


def test_folder_reads_txt_jsonl_parquet_and_notes_unknown_types(tmp_path):
    pa, pq = parquet()
    root = tmp_path / "corpus"
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "one.txt").write_text("first document", encoding="utf-8")
    (root / "alpha" / "sub").mkdir()
    (root / "alpha" / "sub" / "two.txt").write_bytes(b"second \xff document")
    (root / "alpha" / "notes.pdf").write_bytes(b"%PDF")
    (root / "alpha" / ".hidden.txt").write_text("never read", encoding="utf-8")
    write_jsonl(root / "beta" / "b.jsonl", [{"text": "line one"}, {"text": "line two", "x": 1}])
    (root / "gamma").mkdir()
    pq.write_table(pa.table({"text": ["row zero", "row one"]}), root / "gamma" / "g.parquet")
    (root / "README.md").write_text("top-level file", encoding="utf-8")

    src = open_source(root)
    assert isinstance(src, FolderSource)
    assert src.domains == ["alpha", "beta", "gamma"]
    docs = list(src.documents(everything))
    assert [(d.domain, d.text, d.replaced) for d in docs] == [
        ("alpha", "first document", 0),
        ("alpha", "second \ufffd document", 1),
        ("beta", "line one", 0),
        ("beta", "line two", 0),
        ("gamma", "row zero", 0),
        ("gamma", "row one", 0),
    ]
    assert docs[2].where == f"{root / 'beta' / 'b.jsonl'}:1"
    assert docs[5].where == f"{root / 'gamma' / 'g.parquet'}:row 1"
    assert len(src.notes) == 2
    assert "README.md" in src.notes[0]
    assert "alpha/notes.pdf" in src.notes[1] and "unsupported" in src.notes[1]
    assert [f[0] for f in src.fingerprint()["files"]] == [
        "alpha/one.txt",
        "alpha/sub/two.txt",
        "beta/b.jsonl",
        "gamma/g.parquet",
    ]


def test_documents_stop_when_the_consumer_has_enough(tmp_path):
    root = tmp_path / "c"
    for i in range(5):
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{i}.txt").write_text(f"doc {i}", encoding="utf-8")
    src = FolderSource(root)
    seen: list[str] = []

    def wants(_d: str) -> bool:
        return len(seen) < 2

    for doc in src.documents(wants):
        seen.append(doc.text)
    assert seen == ["doc 0", "doc 1"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{not json}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        list(iter_jsonl(bad, "text"))
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(
        DataError, match=r"m\.jsonl:2: no field 'text' \(fields: body\); set --text-field"
    ):
        list(iter_jsonl(missing, "text"))
    wrong = write_jsonl(tmp_path / "w.jsonl", [{"text": 3}])
    with pytest.raises(DataError, match=r"w\.jsonl:1: field 'text' is a int, not a string"):
        list(iter_jsonl(wrong, "text"))
    array = tmp_path / "a.jsonl"
    array.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:1: expected a JSON object"):
        list(iter_jsonl(array, "text"))


def test_jsonl_null_text_is_an_empty_document_and_field_is_configurable(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"body": None}, {"body": "hello"}])
    assert [r[1] for r in iter_jsonl(path, "body")] == ["", "hello"]


def test_single_jsonl_file_with_domain_column(tmp_path):
    path = write_jsonl(
        tmp_path / "all.jsonl",
        [
            {"text": "a1", "src": "law"},
            {"text": "b1", "src": "code"},
            {"text": "a2", "src": "law"},
        ],
    )
    src = open_source(path, domain_column="src")
    assert isinstance(src, FileSource) and src.domains is None
    got = [(d.domain, d.text) for d in src.documents(lambda d: d == "law")]
    assert got == [("law", "a1"), ("law", "a2")]
    no_domain = write_jsonl(tmp_path / "nd.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"nd\.jsonl:1: no domain in field 'domain'"):
        list(FileSource(no_domain).documents(everything))
    bad_name = write_jsonl(tmp_path / "bn.jsonl", [{"text": "x", "domain": "a/b"}])
    with pytest.raises(DataError, match="domain name 'a/b' cannot be used"):
        list(FileSource(bad_name).documents(everything))


def test_single_parquet_file_with_domain_column_and_binary_text(tmp_path):
    pa, pq = parquet()
    path = tmp_path / "all.parquet"
    table = pa.table(
        {
            "content": pa.array([b"caf\xe9 ok", b"plain", None], type=pa.binary()),
            "domain": ["x", "y", "x"],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    src = FileSource(path, text_field="content")
    got = [(d.domain, d.text, d.replaced, d.where) for d in src.documents(everything)]
    assert got == [
        ("x", "caf\ufffd ok", 1, f"{path}:row 0"),
        ("y", "plain", 0, f"{path}:row 1"),
        ("x", "", 0, f"{path}:row 2"),
    ]
    with pytest.raises(DataError, match=r"has no column 'text' \(columns: content, domain\)"):
        list(FileSource(path).documents(everything))
    with pytest.raises(DataError, match="has no column 'topic'"):
        list(FileSource(path, text_field="content", domain_column="topic").documents(everything))


def test_bad_source_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="has no domain sub-folders"):
        open_source(tmp_path / "flat")
    with pytest.raises(DataError, match=r"must be \.jsonl or \.parquet"):
        open_source(tmp_path / "flat" / "a.txt")
    (tmp_path / "badname" / "has space").mkdir(parents=True)
    with pytest.raises(DataError, match="domain name 'has space' cannot be used"):
        open_source(tmp_path / "badname")


def test_empty_domain_is_an_error(tmp_path):
    root = tmp_path / "c"
    (root / "full").mkdir(parents=True)
    (root / "full" / "a.txt").write_text("text", encoding="utf-8")
    (root / "none").mkdir()
    with pytest.raises(
        DataError, match=r"domain 'none' is empty: .* has no \.txt, \.jsonl or \.parquet files"
    ):
        list(open_source(root).documents(everything))
    # Not asked for, not an error.
    assert [d.text for d in open_source(root).documents(lambda d: d == "full")] == ["text"]
    (root / "none" / "e.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"domain 'none' is empty: its files .* hold no document"):
        list(open_source(root).documents(everything))
