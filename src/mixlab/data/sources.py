"""Readers of user text: a folder with one sub-folder per domain, or one file with a domain column.

Two layouts are accepted for ``mixlab prepare --source PATH``:

* a folder whose sub-folders are the domains (``PATH/code/``, ``PATH/legal/``, ...), each holding
  ``.txt`` files (one document per file), ``.jsonl`` files (one document per line, in the field
  ``text_field``) and ``.parquet`` files (one document per row, column ``text_field``), searched
  recursively;
* one ``.jsonl`` or ``.parquet`` file whose records carry the domain in ``domain_column``.

Everything streams: a ``.jsonl`` file is read line by line and a ``.parquet`` file batch by batch,
so memory stays bounded whatever the corpus size. Bytes that are not valid UTF-8 are replaced by
U+FFFD and counted per document (``RawDoc.replaced``). Hidden files and folders (names starting
with ``.``) are ignored; any other file of an unsupported type is skipped with a note.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mixlab.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
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


def _require_pyarrow(path: Path) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'mixlab[parquet]'.") from None
    return pq


def read_txt(path: Path) -> tuple[str, int]:
    """A ``.txt`` file as one document: (text, replaced characters)."""
    return decode_bytes(path.read_bytes())


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
    path: Path, text_field: str, domain_field: str | None = None
) -> Iterator[tuple[str | None, str, int, str]]:
    """Records of a ``.jsonl`` file as (domain or None, text, replaced characters, 'file:line').

    Blank lines are skipped. A line that is not a JSON object, or lacks ``text_field`` (or
    ``domain_field`` when given), is a ``DataError`` naming the file and line.
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
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
    path: Path, text_column: str, domain_column: str | None = None
) -> Iterator[tuple[str | None, str, int, str]]:
    """Rows of a ``.parquet`` file as (domain or None, text, replaced characters, 'file:row N').

    Reads ``_PARQUET_BATCH_ROWS`` rows at a time and only the needed columns. Text is taken as
    bytes and decoded here, so invalid UTF-8 is replaced and counted as for the other formats.
    """
    pq = _require_pyarrow(path)
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
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


def _file_stat(path: Path, name: str) -> list[Any]:
    st = path.stat()
    return [name, st.st_size, st.st_mtime_ns]


@dataclass
class FolderSource:
    """A folder with one sub-folder per domain (see the module docstring)."""

    root: Path
    text_field: str = "text"
    label: str = ""
    domains: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, list[Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.label = self.label or str(self.root.resolve())
        subdirs = sorted(
            p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        loose = sorted(
            p.name for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not subdirs:
            raise DataError(
                f"source folder '{self.root}' has no domain sub-folders; put each domain's "
                f"files in a sub-folder named after it (e.g. {self.root}/news/*.txt), or pass "
                "one .jsonl or .parquet file with a domain column."
            )
        if loose:
            self.notes.append(
                f"skipped {len(loose)} file(s) at the top of {self.root} (only sub-folders are "
                f"domains): {_shortlist(loose)}"
            )
        for sub in subdirs:
            name = check_domain_name(sub.name, f"source folder '{self.root}'")
            found = sorted(p for p in sub.rglob("*") if p.is_file() and _visible(p, sub))
            kept = [p for p in found if p.suffix.lower() in SUPPORTED_SUFFIXES]
            other = [
                str(p.relative_to(self.root))
                for p in found
                if p.suffix.lower() not in SUPPORTED_SUFFIXES
            ]
            if other:
                self.notes.append(
                    f"skipped {len(other)} file(s) of unsupported type in domain '{name}' "
                    f"(only {', '.join(SUPPORTED_SUFFIXES)} are read): {_shortlist(other)}"
                )
            self.files[name] = kept
        self.domains = list(self.files)

    def origin(self, domain: str) -> str:
        return str((self.root / domain).resolve())

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        for domain, files in self.files.items():
            if not wants(domain):
                continue
            if not files:
                raise DataError(
                    f"domain '{domain}' is empty: {self.root / domain} has no .txt, .jsonl or "
                    ".parquet files."
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
                    f"domain '{domain}' is empty: its files in {self.root / domain} hold no "
                    "document."
                )

    def _read(self, domain: str, path: Path) -> Iterator[RawDoc]:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            text, replaced = read_txt(path)
            yield RawDoc(domain, text, str(path), replaced)
            return
        records = (
            iter_jsonl(path, self.text_field)
            if suffix == ".jsonl"
            else iter_parquet(path, self.text_field)
        )
        for _, text, replaced, where in records:
            yield RawDoc(domain, text, where, replaced)

    def fingerprint(self) -> dict[str, Any]:
        files = [
            _file_stat(p, str(p.relative_to(self.root))) for fs in self.files.values() for p in fs
        ]
        return {"kind": "folder", "root": self.label, "files": files}


@dataclass
class FileSource:
    """One ``.jsonl`` or ``.parquet`` file whose records name their domain in ``domain_column``."""

    path: Path
    text_field: str = "text"
    domain_column: str = "domain"
    label: str = ""
    domains: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.label = self.label or str(self.path.resolve())
        if self.path.suffix.lower() not in (".jsonl", ".parquet"):
            raise DataError(
                f"source file '{self.path}' must be .jsonl or .parquet with a "
                f"'{self.domain_column}' column (or pass a folder with one sub-folder per domain)."
            )

    def origin(self, domain: str) -> str:
        return f"{self.label} ({self.domain_column} = {domain})"

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        reader = iter_jsonl if self.path.suffix.lower() == ".jsonl" else iter_parquet
        checked: set[str] = set()
        for domain, text, replaced, where in reader(self.path, self.text_field, self.domain_column):
            assert domain is not None
            if domain not in checked:
                check_domain_name(domain, where)
                checked.add(domain)
            if wants(domain):
                yield RawDoc(domain, text, where, replaced)

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "path": self.label,
            "files": [_file_stat(self.path, self.path.name)],
        }


def open_source(
    path: str | Path, text_field: str = "text", domain_column: str = "domain"
) -> TextSource:
    """The reader for a user path: a folder of domain sub-folders, or one .jsonl/.parquet file."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"source '{p}' does not exist; pass a folder with one sub-folder per domain, a "
            ".jsonl/.parquet file with a domain column, or 'builtin'."
        )
    if p.is_dir():
        return FolderSource(p, text_field=text_field)
    return FileSource(p, text_field=text_field, domain_column=domain_column)


def _shortlist(names: list[str], k: int = 5) -> str:
    more = f", ... ({len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more
