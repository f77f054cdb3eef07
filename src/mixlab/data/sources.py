"""Readers of user text: a folder with one sub-folder per domain, or one file with a domain column.

Two layouts are accepted for ``mixlab prepare --source PATH``:

* a folder whose sub-folders are the domains (``PATH/code/``, ``PATH/legal/``, ...), each holding
  ``.txt`` files (one document per file), ``.jsonl`` files (one document per line, in the field
  ``text_field``) and ``.parquet`` files (one document per row, column ``text_field``), searched
  recursively;
* one ``.jsonl`` or ``.parquet`` file whose records carry the domain in ``domain_column``.

``.txt`` and ``.jsonl`` files may be compressed: ``.gz``, ``.bz2``, ``.xz`` (standard library) and
``.zst`` (the ``zstandard`` package), e.g. ``news/part-0.jsonl.zst``; they are decompressed as a
stream, and what is read is exactly what the uncompressed file would give.

``PATH`` may also be an fsspec URL (``memory://``, ``file://``, ``s3://``, ``gs://``, ``hf://``,
...) of either layout; the protocol's package (``s3fs``, ``gcsfs``, ...) must be installed.
Folders that only ``datasets`` can read (``save_to_disk`` folders, csv/json/arrow files, a flat
folder of files with a domain column) and ``hf:NAME`` go to ``mixlab.data.hf_datasets``.

Everything streams: a ``.jsonl`` file is read line by line and a ``.parquet`` file batch by batch,
so memory stays bounded whatever the corpus size. Bytes that are not valid UTF-8 are replaced by
U+FFFD and counted per document (``RawDoc.replaced``). Hidden files and folders (names starting
with ``.``) are ignored; any other file of an unsupported type is skipped with a note.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import lzma
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from mixlab.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
"""Compressed files the plain readers decompress (``.txt`` and ``.jsonl`` only: parquet files
compress their pages themselves)."""
_COMPRESSIBLE = (".txt", ".jsonl")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class RawDoc:
    """One document as read, before cleaning."""

    domain: str
    text: str
    where: str
    """The file (and line or row) it came from, for messages."""
    replaced: int = 0
    """Characters replaced by U+FFFD because the bytes were not valid UTF-8."""


class TextSource(Protocol):
    """A corpus split into domains, read as a stream of documents.

    ``documents(wants)`` yields documents of every domain for which ``wants(domain)`` is true,
    and asks again before each document (or file), so a consumer that has enough of a domain
    (a byte cap) stops its reading early.
    """

    label: str
    """'builtin' or the source path, recorded in the manifest."""
    domains: list[str] | None
    """Domain names when known before reading (folder, builtin); None for a single file."""
    notes: list[str]
    """Things the user should know (skipped files), filled while scanning and reading."""

    def origin(self, domain: str) -> str:
        """Where a domain's text comes from, in words (recorded per domain in the manifest)."""
        ...

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]: ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the inputs (files with sizes and mtimes, package versions)."""
        ...


def decode_bytes(data: bytes) -> tuple[str, int]:
    """UTF-8 text of ``data`` and the number of characters replaced because it was not valid."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Valid U+FFFD already present in the input are not replacements: count only the new ones.
        present = data.decode("utf-8", errors="ignore").count("\ufffd")
        return text, text.count("\ufffd") - present


def check_domain_name(name: str, where: str) -> str:
    """Return ``name`` if it can name a shard folder, else raise ``DataError`` saying where it came from."""
    if not _DOMAIN_NAME.match(name):
        raise DataError(
            f"{where}: domain name {name!r} cannot be used; domain names are letters, digits, "
            "'_', '-' and '.', not starting with '.' or '-'."
        )
    return name


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def file_format(name: str | Path) -> tuple[str, str]:
    """(format suffix, compression suffix or '') of a file name, lower case:
    ``a.jsonl.zst`` -> ``('.jsonl', '.zst')``, ``b.txt`` -> ``('.txt', '')``."""
    lower = PurePosixPath(str(name)).name.lower()
    for comp in COMPRESSIONS:
        if lower.endswith(comp):
            return PurePosixPath(lower[: -len(comp)]).suffix, comp
    return PurePosixPath(lower).suffix, ""


def readable(name: str | Path) -> bool:
    """Whether the plain readers read this file (``.txt``/``.jsonl``/``.parquet``, the first
    two possibly compressed)."""
    fmt, comp = file_format(name)
    return fmt in SUPPORTED_SUFFIXES and (not comp or fmt in _COMPRESSIBLE)


_FORMATS_IN_WORDS = ".txt, .jsonl, .parquet (.txt/.jsonl also as .gz, .bz2, .xz, .zst)"


def _require_zstandard(path: Any) -> Any:
    try:
        import zstandard
    except ImportError:
        raise DataError(f"reading {path} needs zstandard: pip install zstandard.") from None
    return zstandard


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError]
    with contextlib.suppress(ImportError):
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


@contextlib.contextmanager
def open_binary(path: Any, fs: Any = None, shown: Any = None) -> Iterator[IO[bytes]]:
    """``path`` opened for reading bytes, decompressed as a stream when its name ends in one of
    ``COMPRESSIONS``; ``fs``: an fsspec filesystem (None: the local one). A corrupt compressed
    file is a ``DataError`` naming it (``shown``, default ``path``)."""
    _, comp = file_format(path)
    raw: Any = fs.open(path, "rb") if fs is not None else open(path, "rb")  # noqa: SIM115
    try:
        if not comp:
            yield raw
            return
        zstd = _require_zstandard(shown or path) if comp == ".zst" else None
        try:
            if comp == ".gz":
                stream: Any = gzip.GzipFile(fileobj=raw)
            elif comp == ".bz2":
                stream = bz2.BZ2File(raw)
            elif comp == ".xz":
                stream = lzma.LZMAFile(raw)  # noqa: SIM115 (closed by the with below)
            else:
                # read_across_frames: a file of several frames (zstd --rsyncable, cat a b) is
                # one stream, as the zstd tool reads it.
                reader = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                stream = io.BufferedReader(reader)
            with stream:
                yield stream
        except _decompress_errors() as exc:
            raise DataError(f"{shown or path}: cannot decompress {comp} file ({exc}).") from None
    finally:
        raw.close()


def _require_pyarrow(path: Any) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'mixlab[parquet]'.") from None
    return pq


def read_txt(path: Path | str, fs: Any = None) -> tuple[str, int]:
    """A ``.txt`` file (possibly compressed) as one document: (text, replaced characters)."""
    with open_binary(path, fs, _shown(path, fs)) as fh:
        return decode_bytes(fh.read())


def _shown(path: Any, fs: Any) -> str:
    """How a file is named in messages: its path, or its URL on an fsspec filesystem."""
    return str(path) if fs is None else fs.unstrip_protocol(str(path))


def _field_text(value: Any, name: str, where: str) -> str:
    """A record's text field: a string, or '' for null (dropped later as an empty document)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{name}' is a {type(value).__name__}, not a string; "
            "set --text-field to the field that holds the text."
        )
    return value


def iter_jsonl(
    path: Path | str, text_field: str, domain_field: str | None = None, fs: Any = None
) -> Iterator[tuple[str | None, str, int, str]]:
    """Records of a ``.jsonl`` file (possibly compressed; on ``fs`` when given) as
    (domain or None, text, replaced characters, 'file:line').

    Blank lines are skipped. A line that is not a JSON object, or lacks ``text_field`` (or
    ``domain_field`` when given), is a ``DataError`` naming the file and line.
    """
    shown = _shown(path, fs)
    with open_binary(path, fs, shown) as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{shown}:{lineno}"
            line, replaced = decode_bytes(raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not valid JSON ({exc.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object with a '{text_field}' field.")
            if text_field not in record:
                keys = ", ".join(sorted(record)) or "none"
                raise DataError(
                    f"{where}: no field '{text_field}' (fields: {keys}); set --text-field."
                )
            text = _field_text(record[text_field], text_field, where)
            domain = None
            if domain_field is not None:
                value = record.get(domain_field)
                if value is None or isinstance(value, (dict, list)):
                    raise DataError(
                        f"{where}: no domain in field '{domain_field}'; set --domain-column."
                    )
                domain = str(value)
            yield domain, text, replaced, where


def iter_parquet(
    path: Path | str, text_column: str, domain_column: str | None = None, fs: Any = None
) -> Iterator[tuple[str | None, str, int, str]]:
    """Rows of a ``.parquet`` file (on ``fs`` when given) as
    (domain or None, text, replaced characters, 'file:row N').

    Reads ``_PARQUET_BATCH_ROWS`` rows at a time and only the needed columns. Text is taken as
    bytes and decoded here, so invalid UTF-8 is replaced and counted as for the other formats.
    """
    shown = _shown(path, fs)
    pq = _require_pyarrow(shown)
    import pyarrow as pa

    handle = fs.open(path, "rb") if fs is not None else None
    try:
        yield from _parquet_rows(
            pq, pa, handle if handle is not None else path, shown, text_column, domain_column
        )
    finally:
        if handle is not None:
            handle.close()


def _parquet_rows(
    pq: Any, pa: Any, source: Any, path: str, text_column: str, domain_column: str | None
) -> Iterator[tuple[str | None, str, int, str]]:
    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}).") from None
    names = pf.schema_arrow.names
    wanted = [text_column] + ([domain_column] if domain_column is not None else [])
    for col in wanted:
        if col not in names:
            flag = "--text-field" if col == text_column else "--domain-column"
            raise DataError(
                f"{path} has no column '{col}' (columns: {', '.join(names)}); set {flag}."
            )
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=wanted):
        texts = batch.column(0)
        kind = texts.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            texts = texts.cast(pa.large_binary())
        elif not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise DataError(f"{path}: column '{text_column}' holds {kind}, not text.")
        domains = batch.column(1).to_pylist() if domain_column is not None else None
        for i, value in enumerate(texts.to_pylist()):
            where = f"{path}:row {row + i}"
            text, replaced = decode_bytes(value) if value is not None else ("", 0)
            domain = None
            if domains is not None:
                if domains[i] is None:
                    raise DataError(f"{where}: no domain in column '{domain_column}'.")
                domain = str(domains[i])
            yield domain, text, replaced, where
        row += batch.num_rows


def _file_stat(path: Path | str, name: str, fs: Any = None) -> list[Any]:
    if fs is None:
        st = Path(path).stat()
        return [name, st.st_size, st.st_mtime_ns]
    # fsspec backends name the modification time differently; any of them identifies a version.
    info = fs.info(path)
    stamp = next(
        (
            info[k]
            for k in ("mtime", "LastModified", "last_modified", "updated", "created", "ETag")
            if info.get(k) is not None
        ),
        None,
    )
    return [name, info.get("size"), str(stamp)]


def is_url(source: str) -> bool:
    """Whether a ``--source`` is an fsspec URL (``PROTOCOL://...``) rather than a local path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", source) is not None


def url_filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a URL; a missing backend package is a ``DataError``
    naming it (``s3://`` needs ``s3fs``, ``gs://`` ``gcsfs``, ...)."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise DataError(f"reading {url} needs fsspec: pip install fsspec.") from None
    protocol = url.split("://", 1)[0].lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        impl = known_implementations.get(protocol, {}).get("class", "")
        package = impl.split(".", 1)[0] if impl else f"the fsspec backend for '{protocol}'"
        raise DataError(
            f"reading {url} needs {package} (the fsspec backend for {protocol}://): "
            f"pip install {package}."
        ) from None
    except ValueError as exc:
        raise DataError(f"cannot read {url}: {exc}.") from None


@dataclass
class FolderSource:
    """A folder with one sub-folder per domain (see the module docstring); ``fs``: an fsspec
    filesystem holding it (None: a local folder)."""

    root: Path | str
    text_field: str = "text"
    label: str = ""
    domains: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, list[Any]] = field(default_factory=dict)
    fs: Any = None

    def __post_init__(self) -> None:
        subdirs, loose = self._scan_top()
        if not subdirs:
            raise DataError(
                f"source folder '{self._show(self.root)}' has no domain sub-folders; put each "
                f"domain's files in a sub-folder named after it (e.g. "
                f"{self._show(self._join(self.root, 'news'))}/*.txt), or pass one .jsonl or "
                ".parquet file with a domain column."
            )
        if loose:
            self.notes.append(
                f"skipped {len(loose)} file(s) at the top of {self._show(self.root)} (only "
                f"sub-folders are domains): {_shortlist(loose)}"
            )
        for sub in subdirs:
            name = check_domain_name(sub, f"source folder '{self._show(self.root)}'")
            found = self._scan_domain(sub)
            kept = [p for p in found if readable(p)]
            other = [self._rel(p) for p in found if not readable(p)]
            if other:
                self.notes.append(
                    f"skipped {len(other)} file(s) of unsupported type in domain '{name}' "
                    f"(only {_FORMATS_IN_WORDS} are read): {_shortlist(other)}"
                )
            self.files[name] = kept
        self.domains = list(self.files)

    # --- the two filesystems: local paths (Path) or an fsspec filesystem (str paths) ----------

    def _scan_top(self) -> tuple[list[str], list[str]]:
        """Names of the visible sub-folders and of the visible files at the top, sorted."""
        if self.fs is None:
            self.root = Path(self.root)
            self.label = self.label or str(self.root.resolve())
            entries = list(self.root.iterdir())
            dirs = [p.name for p in entries if p.is_dir()]
            files = [p.name for p in entries if p.is_file()]
        else:
            self.root = str(self.root).rstrip("/")
            self.label = self.label or self._show(self.root)
            entries = self.fs.ls(self.root, detail=True)
            names = [(PurePosixPath(e["name"]).name, e["type"]) for e in entries]
            dirs = [n for n, kind in names if kind == "directory"]
            files = [n for n, kind in names if kind == "file"]
        return (
            sorted(n for n in dirs if not n.startswith(".")),
            sorted(n for n in files if not n.startswith(".")),
        )

    def _scan_domain(self, sub: str) -> list[Any]:
        """The visible files under a domain's sub-folder, recursively, sorted."""
        if self.fs is None:
            assert isinstance(self.root, Path)
            base = self.root / sub
            return sorted(p for p in base.rglob("*") if p.is_file() and _visible(p, base))
        base_s = self._join(self.root, sub)
        found = self.fs.find(base_s)
        return sorted(
            p
            for p in found
            if not any(part.startswith(".") for part in PurePosixPath(p[len(base_s) :]).parts[1:])
        )

    def _join(self, root: Path | str, name: str) -> Path | str:
        return root / name if isinstance(root, Path) else f"{root}/{name}"

    def _rel(self, path: Any) -> str:
        if self.fs is None:
            return str(Path(path).relative_to(self.root))
        return str(path)[len(str(self.root)) + 1 :]

    def _show(self, path: Any) -> str:
        return _shown(path, self.fs)

    def origin(self, domain: str) -> str:
        if self.fs is None:
            return str((Path(self.root) / domain).resolve())
        return self._show(self._join(self.root, domain))

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        for domain, files in self.files.items():
            if not wants(domain):
                continue
            where = self._show(self._join(self.root, domain))
            if not files:
                raise DataError(
                    f"domain '{domain}' is empty: {where} has no .txt, .jsonl or .parquet files "
                    "(compressed .txt/.jsonl included)."
                )
            n = 0
            for path in files:
                if not wants(domain):
                    break
                for doc in self._read(domain, path):
                    n += 1
                    yield doc
                    if not wants(domain):
                        break
            if n == 0:
                raise DataError(
                    f"domain '{domain}' is empty: its files in {where} hold no document."
                )

    def _read(self, domain: str, path: Any) -> Iterator[RawDoc]:
        suffix = file_format(path)[0]
        if suffix == ".txt":
            text, replaced = read_txt(path, self.fs)
            yield RawDoc(domain, text, self._show(path), replaced)
            return
        records = (
            iter_jsonl(path, self.text_field, fs=self.fs)
            if suffix == ".jsonl"
            else iter_parquet(path, self.text_field, fs=self.fs)
        )
        for _, text, replaced, where in records:
            yield RawDoc(domain, text, where, replaced)

    def fingerprint(self) -> dict[str, Any]:
        files = [_file_stat(p, self._rel(p), self.fs) for fs in self.files.values() for p in fs]
        return {"kind": "folder", "root": self.label, "files": files}


@dataclass
class FileSource:
    """One ``.jsonl`` (possibly compressed) or ``.parquet`` file whose records name their domain
    in ``domain_column``; ``fs``: an fsspec filesystem holding it (None: a local file)."""

    path: Path | str
    text_field: str = "text"
    domain_column: str = "domain"
    label: str = ""
    domains: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    fs: Any = None

    def __post_init__(self) -> None:
        if self.fs is None:
            self.path = Path(self.path)
            self.label = self.label or str(self.path.resolve())
        else:
            self.path = str(self.path)
            self.label = self.label or _shown(self.path, self.fs)
        if file_format(self.path)[0] not in (".jsonl", ".parquet") or not readable(self.path):
            raise DataError(
                f"source file '{_shown(self.path, self.fs)}' must be .jsonl or .parquet with a "
                f"'{self.domain_column}' column (.jsonl also as .gz, .bz2, .xz or .zst; .json, "
                ".csv and .arrow with pip install 'mixlab[datasets]'), or pass a folder with one "
                "sub-folder per domain."
            )

    def origin(self, domain: str) -> str:
        return f"{self.label} ({self.domain_column} = {domain})"

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        reader = iter_jsonl if file_format(self.path)[0] == ".jsonl" else iter_parquet
        checked: set[str] = set()
        rows = reader(self.path, self.text_field, self.domain_column, fs=self.fs)
        for domain, text, replaced, where in rows:
            assert domain is not None
            if domain not in checked:
                check_domain_name(domain, where)
                checked.add(domain)
            if wants(domain):
                yield RawDoc(domain, text, where, replaced)

    def fingerprint(self) -> dict[str, Any]:
        name = PurePosixPath(str(self.path)).name
        return {"kind": "file", "path": self.label, "files": [_file_stat(self.path, name, self.fs)]}


def open_source(
    path: str | Path, text_field: str = "text", domain_column: str = "domain"
) -> TextSource:
    """The reader for a user source: a folder of domain sub-folders or one .jsonl/.parquet file
    (local or an fsspec URL), or what ``mixlab.data.hf_datasets`` reads (``hf:NAME``,
    ``save_to_disk`` folders, folders and files only ``datasets`` reads)."""
    from mixlab.data import hf_datasets

    name = str(path)
    if name.startswith(hf_datasets.HUB_PREFIX):
        return hf_datasets.open_hub(name, text_field, domain_column)
    if is_url(name):
        fs, inner = url_filesystem(name)
        if not fs.exists(inner):
            raise DataError(
                f"source '{name}' does not exist; pass a folder with one sub-folder per domain "
                "or a .jsonl/.parquet file with a domain column."
            )
        if fs.isdir(inner):
            return FolderSource(inner, text_field=text_field, label=name, fs=fs)
        return FileSource(inner, text_field, domain_column, label=name, fs=fs)
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"source '{p}' does not exist; pass a folder with one sub-folder per domain, a "
            ".jsonl/.parquet file with a domain column, an fsspec URL, hf:NAME or 'builtin'."
        )
    if p.is_dir():
        if hf_datasets.needs_datasets(p):
            return hf_datasets.open_folder(p, text_field, domain_column)
        return FolderSource(p, text_field=text_field)
    if not readable(p) and hf_datasets.datasets_builder(p.name) is not None:
        return hf_datasets.open_files(p, [p], text_field, domain_column)
    return FileSource(p, text_field=text_field, domain_column=domain_column)


def _shortlist(names: list[str], k: int = 5) -> str:
    more = f", ... ({len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more
