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


# --- compressed files, fsspec URLs, one-line errors (issue 16) ------------------------------

WORDS = ["river", "stone", "light", "water", "green", "field", "lambda", "yield"]


def corpus_texts(domain: str, n: int) -> list[str]:
    """n distinct documents of at least 32 characters (prepare's default min_chars)."""
    return [
        f"{domain} document {j}: " + " ".join(WORDS[(j * 3 + i * (j + 1)) % 8] for i in range(10))
        for j in range(n)
    ]


def compress(data: bytes, comp: str) -> bytes:
    """``data`` compressed by the standard tools' libraries (independent of mixlab's reader)."""
    import bz2
    import gzip
    import lzma

    if comp == ".gz":
        return gzip.compress(data)
    if comp == ".bz2":
        return bz2.compress(data)
    if comp == ".xz":
        return lzma.compress(data)
    zstd = pytest.importorskip("zstandard")
    # Two frames, as `cat a.zst b.zst` or `zstd --rsyncable` give: the reader must read across.
    half = len(data) // 2
    c = zstd.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


def write_plain_corpus(root: Path) -> dict[str, list[str]]:
    """alpha: one .txt per document; beta: one .jsonl file (with a non-UTF-8 byte)."""
    texts = {"alpha": corpus_texts("alpha", 14), "beta": corpus_texts("beta", 12)}
    (root / "alpha").mkdir(parents=True)
    for j, t in enumerate(texts["alpha"]):
        (root / "alpha" / f"{j:03d}.txt").write_text(t, encoding="utf-8")
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in texts["beta"])
    (root / "beta").mkdir()
    (root / "beta" / "docs.jsonl").write_bytes(lines[:40] + b"\xff" + lines[40:])
    return texts


def compressed_copy(src: Path, dst: Path, comp: str) -> None:
    """The same corpus with every file compressed (``name.txt`` -> ``name.txt.gz``)."""
    for p in sorted(src.rglob("*")):
        if p.is_file():
            out = dst / p.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_name(out.name + comp).write_bytes(compress(p.read_bytes(), comp))


def data_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def manifest_without_source(out: Path) -> dict:
    """The manifest less what names the source (its path and the hash of its files)."""
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for key in ("command", "source", "inputs_hash"):
        m.pop(key)
    for key in ("source", "out"):
        m["extra"]["prepare"].pop(key)
    for d in m["domains"]:
        d.pop("source")
    return m


def assert_same_data_dir(a: Path, b: Path) -> None:
    """Shards, index files and tokenizer files byte-identical; manifests equal but for the
    source's name."""
    fa, fb = data_files(a), data_files(b)
    fa.pop("manifest.json"), fb.pop("manifest.json")
    assert sorted(fa) == sorted(fb)
    assert any(k.endswith(".bin") for k in fa)
    for k in fa:
        assert fa[k] == fb[k], k
    assert manifest_without_source(a) == manifest_without_source(b)


def test_file_format_of_names():
    from mixlab.data.sources import file_format, readable

    assert file_format("a.jsonl.zst") == (".jsonl", ".zst")
    assert file_format("dir.v2/B.TXT.GZ") == (".txt", ".gz")
    assert file_format("x.parquet") == (".parquet", "")
    assert file_format("noext") == ("", "")
    assert readable("a.jsonl.xz") and readable("a.txt.bz2") and readable("p.parquet")
    # Parquet compresses its own pages; a tarball is not a document.
    assert not readable("p.parquet.gz") and not readable("a.tar.gz") and not readable("a.gz")


@pytest.mark.parametrize("comp", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_txt_and_jsonl_read_as_the_plain_files(tmp_path, comp):
    plain = tmp_path / "plain"
    texts = write_plain_corpus(plain)
    packed = tmp_path / "packed"
    compressed_copy(plain, packed, comp)
    src = open_source(packed)
    assert isinstance(src, FolderSource) and src.notes == []
    docs = list(src.documents(everything))
    # The known texts, with the one invalid byte replaced (and counted) as in the plain file.
    beta = [d for d in docs if d.domain == "beta"]
    assert [d.text for d in docs if d.domain == "alpha"] == texts["alpha"]
    assert sum(d.replaced for d in beta) == 1 and len(beta) == len(texts["beta"])
    assert beta[0].where == f"{packed / 'beta' / ('docs.jsonl' + comp)}:1"
    assert [(d.text, d.replaced) for d in docs] == [
        (d.text, d.replaced) for d in open_source(plain).documents(everything)
    ]
    # A single compressed .jsonl with a domain column is a file source too.
    one = tmp_path / f"all.jsonl{comp}"
    records = "".join(json.dumps({"text": t, "domain": "x"}) + "\n" for t in texts["alpha"])
    one.write_bytes(compress(records.encode(), comp))
    assert [d.text for d in open_source(one).documents(everything)] == texts["alpha"]


@pytest.mark.parametrize("comp", [".gz", ".zst"])
def test_compressed_domain_folder_prepares_byte_identical_data_dir(tmp_path, comp):
    from mixlab.data.prepare import PrepareConfig, prepare

    plain, packed = tmp_path / "plain", tmp_path / "packed"
    write_plain_corpus(plain)
    compressed_copy(plain, packed, comp)
    opts = {"vocab_size": 300, "val_fraction": 0.15, "test_fraction": 0.15}
    prepare(PrepareConfig(source=str(plain), out=str(tmp_path / "d_plain"), **opts))
    prepare(PrepareConfig(source=str(packed), out=str(tmp_path / "d_packed"), **opts))
    assert_same_data_dir(tmp_path / "d_plain", tmp_path / "d_packed")


def test_zst_without_zstandard_names_the_package(tmp_path, monkeypatch):
    import sys

    root = tmp_path / "c"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    with pytest.raises(DataError, match=r"x\.jsonl\.zst needs zstandard: pip install zstandard"):
        list(open_source(root).documents(everything))


def test_corrupt_compressed_file_is_one_error_naming_it(tmp_path):
    root = tmp_path / "c"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.jsonl.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"x\.jsonl\.gz: cannot decompress \.gz file"):
        list(open_source(root).documents(everything))


@pytest.fixture
def memfs():
    """fsspec's in-memory filesystem, emptied after the test (it is process-global)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    for path in fs.ls("/", detail=False):
        fs.rm(path, recursive=True)


def test_fsspec_memory_url_prepares_like_the_local_folder(tmp_path, memfs):
    from mixlab.data.prepare import PrepareConfig, prepare

    local = tmp_path / "plain"
    texts = write_plain_corpus(local)
    (local / "alpha" / ".hidden.txt").write_text("never read, hidden", encoding="utf-8")
    for p in sorted(local.rglob("*")):
        if p.is_file():
            memfs.pipe(f"/corpus/{p.relative_to(local).as_posix()}", p.read_bytes())
    src = open_source("memory://corpus")
    assert isinstance(src, FolderSource) and src.domains == ["alpha", "beta"]
    docs = list(src.documents(everything))
    assert [d.text for d in docs if d.domain == "alpha"] == texts["alpha"]
    assert docs[-1].where == "memory:///corpus/beta/docs.jsonl:12"
    assert [f[0] for f in src.fingerprint()["files"]][-1] == "beta/docs.jsonl"
    opts = {"vocab_size": 300, "val_fraction": 0.15, "test_fraction": 0.15}
    prepare(PrepareConfig(source=str(local), out=str(tmp_path / "d_local"), **opts))
    prepare(PrepareConfig(source="memory://corpus", out=str(tmp_path / "d_mem"), **opts))
    assert_same_data_dir(tmp_path / "d_local", tmp_path / "d_mem")
    # A single file URL with a domain column, compressed.
    rows = "".join(json.dumps({"text": t, "src": "law"}) + "\n" for t in texts["beta"])
    memfs.pipe("/one/all.jsonl.gz", compress(rows.encode(), ".gz"))
    one = open_source("memory://one/all.jsonl.gz", domain_column="src")
    assert isinstance(one, FileSource)
    assert [(d.domain, d.text) for d in one.documents(everything)] == [
        ("law", t) for t in texts["beta"]
    ]
    with pytest.raises(DataError, match="source 'memory://nothing' does not exist"):
        open_source("memory://nothing")


def cli_error(argv: list[str], capsys) -> str:
    """The one line ``mixlab`` writes for a user error (exit 2): the last line on stderr, after
    the progress lines of the stages that ran before the error, and no traceback."""
    from mixlab.cli import main

    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert [ln for ln in lines if "error" in ln] == lines[-1:], err
    assert "Traceback" not in err
    return lines[-1]


def test_remote_url_without_its_backend_is_one_line_naming_the_package(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed here")
    pytest.importorskip("fsspec")
    err = cli_error(
        ["prepare", "--source", "s3://bucket/corpus", "--out", str(tmp_path / "d")], capsys
    )
    assert err == (
        "mixlab prepare: error: reading s3://bucket/corpus needs s3fs (the fsspec backend for "
        "s3://): pip install s3fs."
    )


def test_unknown_format_and_missing_text_column_are_one_line(tmp_path, capsys):
    pdf = tmp_path / "paper.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    err = cli_error(["prepare", "--source", str(pdf), "--out", str(tmp_path / "d")], capsys)
    assert err.startswith(f"mixlab prepare: error: source file '{pdf}' must be .jsonl or .parquet")
    assert "pass a folder with one sub-folder per domain" in err
    root = tmp_path / "c"
    write_jsonl(root / "a" / "x.jsonl.gz", [])
    (root / "a" / "x.jsonl.gz").write_bytes(compress(b'{"body": "some text"}\n', ".gz"))
    err = cli_error(["prepare", "--source", str(root), "--out", str(tmp_path / "d")], capsys)
    assert err == (
        f"mixlab prepare: error: {root / 'a' / 'x.jsonl.gz'}:1: no field 'text' (fields: body); "
        "set --text-field."
    )
