"""Sources read through Hugging Face ``datasets`` (the optional extra ``mixlab[datasets]``).

``mixlab prepare --source`` comes here for what the plain readers (``mixlab.data.sources``) do not
read:

* a ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` folder, with a domain column;
* a flat folder of data files (json/jsonl, csv/tsv, parquet, arrow; json, csv and txt also as
  ``.gz``/``.bz2``/``.xz``/``.zst``) with a domain column;
* a folder with one sub-folder per domain where a sub-folder is a ``save_to_disk`` folder or holds
  only files that ``datasets`` reads (csv, json, arrow, ...): one dataset per domain;
* one such file with a domain column;
* ``hf:NAME``: a Hub dataset id, from the local ``datasets`` cache only (``HF_DATASETS_OFFLINE=1``
  is set unless the environment says otherwise: nothing is downloaded).

Memory stays bounded: files are read with ``load_dataset(..., streaming=True)`` and
``save_to_disk`` folders and cached Hub datasets are memory-mapped Arrow, read in batches of
``BATCH_ROWS`` rows. A ``.txt`` file is one document (``sample_by="document"``), as in the plain
readers. Rows come in a fixed order (files sorted by name, splits in their saved order), so the
output is the same on every run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixlab.data.sources import (
    COMPRESSIONS,
    RawDoc,
    _file_stat,
    _shortlist,
    check_domain_name,
    decode_bytes,
    file_format,
    readable,
)
from mixlab.errors import DataError

HUB_PREFIX = "hf:"
BATCH_ROWS = 1024
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}
_STREAM_COMPRESSIBLE = (".json", ".jsonl", ".csv", ".tsv", ".txt")
"""Formats ``datasets`` streams through a compression (columnar files compress themselves)."""
_SAVED_MARKERS = (("dataset_info.json", "state.json"), ("dataset_dict.json",))


def datasets_builder(name: str | Path) -> str | None:
    """The ``datasets`` packaged builder for a file name (``json``, ``csv``, ...), or None."""
    fmt, comp = file_format(name)
    if comp and fmt not in _STREAM_COMPRESSIBLE:
        return None
    return _BUILDERS.get(fmt)


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    return any(all((path / m).is_file() for m in markers) for markers in _SAVED_MARKERS)


def _visible_files(root: Path, recursive: bool) -> list[Path]:
    found = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _only_datasets_reads(folder: Path) -> bool:
    files = _visible_files(folder, recursive=True)
    return not any(readable(p) for p in files) and any(datasets_builder(p) for p in files)


def needs_datasets(root: Path) -> bool:
    """Whether a local folder is a layout only this module reads (see the module docstring);
    the plain readers keep every folder they read today. Looks at names only, imports nothing."""
    if is_saved_dataset(root):
        return True
    subs = _subdirs(root)
    if not subs:
        files = _visible_files(root, recursive=False)
        return any(datasets_builder(p) not in (None, "text") for p in files)
    return any(is_saved_dataset(s) or _only_datasets_reads(s) for s in subs)


def _import_datasets(what: str) -> Any:
    # No network: a Hub id is read from the local cache, never downloaded (set before import,
    # which is when datasets reads these variables).
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading {what} needs the datasets package: pip install 'mixlab[datasets]'."
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _read_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ValueError, OSError, KeyError, TypeError]
    try:
        import pyarrow as pa

        errors.append(pa.ArrowException)
    except ImportError:
        pass
    return tuple(errors)


@dataclass
class _Part:
    """One dataset to read: a domain's (``domain`` set) or one with a domain column (None)."""

    domain: str | None
    where: str
    """The folder, file or hub id, for messages."""
    load: Callable[[], Any]
    """Returns a ``Dataset``, ``IterableDataset`` or a dict of them (splits, read in order)."""


@dataclass
class DatasetsSource:
    """A ``TextSource`` over ``datasets`` objects (see the module docstring)."""

    parts: list[_Part]
    text_field: str
    domain_column: str
    label: str
    inputs: dict[str, Any]
    domains: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        per_domain = [p.domain for p in self.parts if p.domain is not None]
        self.domains = per_domain if per_domain else None

    def origin(self, domain: str) -> str:
        for p in self.parts:
            if p.domain == domain:
                return p.where
        return f"{self.label} ({self.domain_column} = {domain})"

    def documents(self, wants: Callable[[str], bool]) -> Iterator[RawDoc]:
        checked: set[str] = set()
        for part in self.parts:
            if part.domain is not None and not wants(part.domain):
                continue
            n = 0
            for domain, text, replaced, where in self._rows(part, wants):
                if domain not in checked:
                    check_domain_name(domain, where)
                    checked.add(domain)
                if wants(domain):
                    n += 1
                    yield RawDoc(domain, text, where, replaced)
                elif part.domain is not None:
                    break
            if part.domain is not None and n == 0 and wants(part.domain):
                raise DataError(f"domain '{part.domain}' is empty: {part.where} has no rows.")

    def _rows(
        self, part: _Part, wants: Callable[[str], bool]
    ) -> Iterator[tuple[str, str, int, str]]:
        try:
            loaded = part.load()
        except DataError:
            raise
        except _read_errors() as exc:
            raise DataError(f"{part.where}: datasets cannot read it ({_one_line(exc)}).") from None
        splits = list(loaded.items()) if isinstance(loaded, dict) else [("", loaded)]
        for split, ds in splits:
            where = f"{part.where}[{split}]" if split else part.where
            yield from self._split_rows(ds, part, where, wants)

    def _split_rows(
        self, ds: Any, part: _Part, where: str, wants: Callable[[str], bool]
    ) -> Iterator[tuple[str, str, int, str]]:
        wanted = [self.text_field] + ([self.domain_column] if part.domain is None else [])
        names = ds.column_names
        if names is not None:
            _check_columns(where, wanted, list(names), self.text_field)
            if list(names) != wanted:
                ds = ds.select_columns(wanted)
        row = 0
        batches = ds.iter(batch_size=BATCH_ROWS)
        while True:
            if part.domain is not None and not wants(part.domain):
                return
            try:
                batch = next(batches)
            except StopIteration:
                return
            except DataError:
                raise
            except _read_errors() as exc:
                raise DataError(f"{where}: datasets cannot read it ({_one_line(exc)}).") from None
            _check_columns(where, wanted, list(batch), self.text_field)
            texts = batch[self.text_field]
            domains = batch[self.domain_column] if part.domain is None else None
            for i, value in enumerate(texts):
                at = f"{where}:row {row + i}"
                text, replaced = _text(value, self.text_field, at)
                if domains is None:
                    assert part.domain is not None
                    yield part.domain, text, replaced, at
                    continue
                if domains[i] is None or isinstance(domains[i], (dict, list)):
                    raise DataError(
                        f"{at}: no domain in column '{self.domain_column}'; set --domain-column."
                    )
                yield str(domains[i]), text, replaced, at
            row += len(texts)

    def fingerprint(self) -> dict[str, Any]:
        return self.inputs


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_columns(where: str, wanted: list[str], names: list[str], text_field: str) -> None:
    for col in wanted:
        if col not in names:
            flag = "--text-field" if col == text_field else "--domain-column"
            raise DataError(
                f"{where} has no column '{col}' (columns: {', '.join(names) or 'none'}); "
                f"set {flag}."
            )


def _text(value: Any, name: str, where: str) -> tuple[str, int]:
    if value is None:
        return "", 0
    if isinstance(value, str):
        return value, 0
    if isinstance(value, bytes):
        return decode_bytes(value)
    raise DataError(
        f"{where}: column '{name}' holds {type(value).__name__}, not text; "
        "set --text-field to the column that holds the text."
    )


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("datasets")
    except Exception:
        return "not installed"


def _stats(root: Path, files: list[Path]) -> list[list[Any]]:
    return [_file_stat(p, str(p.relative_to(root))) for p in files]


def _saved_part(path: Path, domain: str | None) -> _Part:
    def load() -> Any:
        ds = _import_datasets(str(path))
        loaded = ds.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, ds.DatasetDict) else loaded

    return _Part(domain, str(path), load)


def _files_part(where: Path, files: list[Path], domain: str | None) -> _Part:
    """Files of one format streamed with ``load_dataset``; a mix of formats is an error."""
    builders = sorted({datasets_builder(p) or "?" for p in files})
    if len(builders) != 1 or builders == ["?"]:
        raise DataError(
            f"{where} mixes file formats ({', '.join(b for b in builders)}); put one format "
            "per folder (json/jsonl, csv/tsv, parquet, arrow or txt)."
        )
    builder = builders[0]
    kwargs: dict[str, Any] = {}
    if builder == "text":
        kwargs["sample_by"] = "document"  # one document per file, as the plain readers
    if builder == "csv" and all(file_format(p)[0] == ".tsv" for p in files):
        kwargs["sep"] = "\t"

    def load() -> Any:
        ds = _import_datasets(str(where))
        return ds.load_dataset(
            builder,
            data_files={"train": [str(p) for p in files]},
            split="train",
            streaming=True,
            **kwargs,
        )

    return _Part(domain, str(where), load)


def open_files(
    label: Path, files: list[Path], text_field: str, domain_column: str
) -> DatasetsSource:
    """Files ``datasets`` reads (all of one format) whose rows carry ``domain_column``."""
    _import_datasets(str(label))
    root = label if label.is_dir() else label.parent
    return DatasetsSource(
        [_files_part(label, files, None)],
        text_field,
        domain_column,
        label=str(label.resolve()),
        inputs={"kind": "datasets-files", "datasets": _version(), "files": _stats(root, files)},
    )


def open_folder(root: Path, text_field: str, domain_column: str) -> DatasetsSource:
    """A local folder in one of the layouts of the module docstring."""
    _import_datasets(str(root))
    label = str(root.resolve())
    if is_saved_dataset(root):
        return DatasetsSource(
            [_saved_part(root, None)],
            text_field,
            domain_column,
            label=label,
            inputs={
                "kind": "datasets-saved",
                "datasets": _version(),
                "files": _stats(root, _visible_files(root, recursive=True)),
            },
        )
    subs = _subdirs(root)
    notes: list[str] = []
    if not subs:
        files = _visible_files(root, recursive=False)
        kept = [p for p in files if datasets_builder(p) is not None]
        skipped = [p.name for p in files if datasets_builder(p) is None]
        src = open_files(root, kept, text_field, domain_column)
        if skipped:
            src.notes.append(
                f"skipped {len(skipped)} file(s) of unknown format: {_shortlist(skipped)}"
            )
        return src
    parts = []
    for sub in subs:
        name = check_domain_name(sub.name, f"source folder '{root}'")
        if is_saved_dataset(sub):
            parts.append(_saved_part(sub, name))
            continue
        files = _visible_files(sub, recursive=True)
        kept = [p for p in files if datasets_builder(p) is not None]
        skipped = [str(p.relative_to(root)) for p in files if datasets_builder(p) is None]
        if skipped:
            notes.append(
                f"skipped {len(skipped)} file(s) of unknown format in domain '{name}': "
                f"{_shortlist(skipped)}"
            )
        if not kept:
            raise DataError(
                f"domain '{name}' is empty: {sub} has no file that datasets reads (json/jsonl, "
                f"csv/tsv, parquet, arrow, txt; text formats also as {'/'.join(COMPRESSIONS)}) "
                "and is no save_to_disk folder."
            )
        parts.append(_files_part(sub, kept, name))
    files = _visible_files(root, recursive=True)
    src = DatasetsSource(
        parts,
        text_field,
        domain_column,
        label=label,
        inputs={"kind": "datasets-folder", "datasets": _version(), "files": _stats(root, files)},
    )
    src.notes.extend(notes)
    return src


def open_hub(source: str, text_field: str, domain_column: str) -> DatasetsSource:
    """``hf:NAME`` from the local ``datasets`` cache (every split, in order), with a domain
    column; memory-mapped, never downloaded."""
    name = source[len(HUB_PREFIX) :].strip()
    if not name:
        raise DataError("--source hf: needs a dataset id, e.g. hf:ORG/NAME.")
    ds = _import_datasets(source)
    try:
        loaded = ds.load_dataset(name)
    except (*_read_errors(), ConnectionError, FileNotFoundError) as exc:
        raise DataError(
            f"{source} is not in the local datasets cache (offline: nothing is downloaded); "
            "load it once where there is network, or save_to_disk it and pass that folder "
            f"({_one_line(exc)})."
        ) from None
    splits = dict(loaded) if isinstance(loaded, ds.DatasetDict) else {"": loaded}
    fingerprints = {k: getattr(v, "_fingerprint", None) for k, v in splits.items()}

    def load() -> Any:
        return splits if len(splits) > 1 or "" not in splits else splits[""]

    return DatasetsSource(
        [_Part(None, source, load)],
        text_field,
        domain_column,
        label=source,
        inputs={
            "kind": "datasets-hub",
            "name": name,
            "datasets": _version(),
            "splits": fingerprints,
        },
    )
