"""The on-disk format of a prepared data dir, and its reader.

Layout (``FORMAT_VERSION`` 1)::

    DIR/manifest.json                           what is here (see ``Manifest``)
    DIR/tokenizer.json                          Hugging Face ``tokenizers`` file
    DIR/shards/<domain>/<split>-00000.bin       flat token ids, dtype uint16 or uint32
    DIR/shards/<domain>/<split>-00000.idx.npy   int64 document start offsets, length docs + 1

Every document ends with the EOS token, and that token belongs to the document:
document j of a shard spans ``tokens[idx[j]:idx[j + 1]]``. Splits are by document.

Training reads *windows*: non-overlapping runs of ``length`` tokens laid end to end over each
shard (a window never crosses a shard boundary; the tail of a shard shorter than ``length`` is
not used). Window ``i`` of a domain split is addressed globally across its shards in order.
Nothing here reads a whole shard into memory: shards are opened with ``numpy.memmap``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.errors import DataError

FORMAT_NAME = "mixlab-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32; larger vocabularies are refused."""
    if vocab_size <= 0:
        raise DataError(f"vocabulary size must be positive, got {vocab_size}.")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise DataError(f"vocabulary of {vocab_size} ids does not fit uint32; use a smaller tokenizer.")


@dataclass
class ShardInfo:
    """One shard file pair of a domain split."""

    bin: str
    """Path of the token file, relative to the data dir."""
    idx: str
    """Path of the document offsets file (int64, docs + 1 entries), relative to the data dir."""
    docs: int
    tokens: int


@dataclass
class SplitInfo:
    docs: int = 0
    tokens: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class DomainInfo:
    name: str
    splits: dict[str, SplitInfo]
    source: str = ""
    """Where the text came from (package, folder, file)."""
    bytes: int = 0
    """UTF-8 bytes of text kept after cleaning and de-duplication."""
    replaced_chars: int = 0
    """Characters replaced because the input was not valid UTF-8."""
    dropped_docs: int = 0
    """Documents dropped as empty, too short or duplicate."""


@dataclass
class Manifest:
    """Everything a reader needs to know about a data dir (``manifest.json``)."""

    domains: list[DomainInfo]
    vocab_size: int
    eos_id: int
    dtype: str
    tokenizer_sha256: str
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created_by: str = ""
    command: str = ""
    source: str = ""
    inputs_hash: str = ""
    """Hash of the inputs and options; ``prepare`` with the same hash is a no-op."""
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form additions (e.g. cluster hierarchy and centroids written by ``mixlab cluster``)."""

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    def domain(self, name: str) -> DomainInfo:
        for d in self.domains:
            if d.name == name:
                return d
        raise DataError(
            f"domain '{name}' is not in this data dir; it has: {', '.join(self.domain_names)}."
        )

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = MANIFEST) -> Manifest:
        if data.get("format") != FORMAT_NAME:
            raise DataError(f"{where} is not a mixlab data manifest.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where} was written in data format version {version}; this mixlab reads "
                f"version {FORMAT_VERSION}. Re-run `mixlab prepare` to rebuild the data dir."
            )
        try:
            domains = [
                DomainInfo(
                    **{
                        **d,
                        "splits": {
                            s: SplitInfo(
                                docs=v["docs"],
                                tokens=v["tokens"],
                                shards=[ShardInfo(**sh) for sh in v["shards"]],
                            )
                            for s, v in d["splits"].items()
                        },
                    }
                )
                for d in data["domains"]
            ]
            fields = {k: v for k, v in data.items() if k != "domains"}
            return cls(domains=domains, **fields)
        except (KeyError, TypeError) as exc:
            raise DataError(f"{where} is damaged or incomplete ({exc}); re-run `mixlab prepare`.") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data dirs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it to ``final`` only on success.

    An existing ``final`` is replaced only after the new one is complete, so a failure at any
    point leaves what was there untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shard(root: Path, rel_bin: str, docs: list[np.ndarray], dtype: np.dtype) -> ShardInfo:
    """Write token documents (each already ending in EOS) as one shard under ``root``."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    bin_path = root / rel_bin
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_path, "wb") as fh:
        for d in docs:
            fh.write(np.asarray(d, dtype=dtype).tobytes())
    rel_idx = rel_bin[: -len(".bin")] + ".idx.npy"
    np.save(root / rel_idx, offsets)
    return ShardInfo(bin=rel_bin, idx=rel_idx, docs=len(docs), tokens=int(offsets[-1]))


class ShardWriter:
    """Append documents to a domain split, rolling over to a new shard past ``max_tokens``."""

    def __init__(self, root: Path, domain: str, split: str, dtype: np.dtype, max_tokens: int = 0):
        self.root, self.domain, self.split, self.dtype = Path(root), domain, split, dtype
        self.max_tokens = max_tokens
        self.info = SplitInfo()
        self._fh: Any = None
        self._offsets: list[int] = [0]
        self._rel_bin = ""

    def _open(self) -> None:
        self._rel_bin = f"shards/{self.domain}/{self.split}-{len(self.info.shards):05d}.bin"
        path = self.root / self._rel_bin
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in _close(), spans many add() calls
        self._offsets = [0]

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        rel_idx = self._rel_bin[: -len(".bin")] + ".idx.npy"
        np.save(self.root / rel_idx, np.asarray(self._offsets, dtype=np.int64))
        docs, tokens = len(self._offsets) - 1, self._offsets[-1]
        self.info.shards.append(ShardInfo(self._rel_bin, rel_idx, docs, tokens))
        self.info.docs += docs
        self.info.tokens += tokens
        self._fh = None

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids (ending in EOS)."""
        if self._fh is None:
            self._open()
        self._fh.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self._offsets.append(self._offsets[-1] + len(ids))
        if self.max_tokens and self._offsets[-1] >= self.max_tokens:
            self._close()

    def close(self) -> SplitInfo:
        self._close()
        return self.info


class DomainSplit:
    """Read access to the windows and documents of one domain split, through memmaps."""

    def __init__(self, root: Path, domain: str, split: str, info: SplitInfo, dtype: np.dtype):
        self.root, self.domain, self.split, self.info, self.dtype = root, domain, split, info, dtype
        self._maps: list[np.memmap | None] = [None] * len(info.shards)
        self._offsets: list[np.ndarray | None] = [None] * len(info.shards)

    @property
    def n_tokens(self) -> int:
        return self.info.tokens

    @property
    def n_docs(self) -> int:
        return self.info.docs

    def _map(self, s: int) -> np.ndarray:
        m = self._maps[s]
        if m is None:
            sh = self.info.shards[s]
            if sh.tokens == 0:
                m = np.zeros(0, dtype=self.dtype)
            else:
                m = np.memmap(self.root / sh.bin, dtype=self.dtype, mode="r", shape=(sh.tokens,))
            self._maps[s] = m
        return m

    def offsets(self, s: int) -> np.ndarray:
        o = self._offsets[s]
        if o is None:
            o = np.load(self.root / self.info.shards[s].idx, mmap_mode="r")
            self._offsets[s] = o
        return o

    def window_counts(self, length: int) -> np.ndarray:
        """[n_shards] number of windows of ``length`` tokens in each shard."""
        return np.array([sh.tokens // length for sh in self.info.shards], dtype=np.int64)

    def n_windows(self, length: int) -> int:
        return int(self.window_counts(length).sum())

    def windows(self, index: np.ndarray, length: int) -> np.ndarray:
        """Tokens of windows ``index`` ([k] global window indices) as an int64 array [k, length]."""
        index = np.asarray(index, dtype=np.int64)
        counts = self.window_counts(length)
        ends = np.cumsum(counts)
        total = int(ends[-1]) if len(ends) else 0
        if index.size and (index.min() < 0 or index.max() >= total):
            raise DataError(
                f"window index out of range for {self.domain}/{self.split} ({total} windows)."
            )
        out = np.empty((index.size, length), dtype=np.int64)
        shard = np.searchsorted(ends, index, side="right")
        local = index - (ends[shard] - counts[shard])
        for row, (s, w) in enumerate(zip(shard.tolist(), local.tolist())):
            out[row] = self._map(s)[w * length : (w + 1) * length]
        return out

    def document(self, j: int) -> np.ndarray:
        """Token ids of document ``j`` (global across shards), EOS included."""
        for s, sh in enumerate(self.info.shards):
            if j < sh.docs:
                o = self.offsets(s)
                return np.asarray(self._map(s)[int(o[j]) : int(o[j + 1])], dtype=np.int64)
            j -= sh.docs
        raise DataError(f"document index out of range for {self.domain}/{self.split}.")


class DataDir:
    """An opened, validated data dir. ``DataDir.open(path)`` checks every shard's size."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self.dtype = np.dtype(manifest.dtype)
        self._splits: dict[tuple[str, str], DomainSplit] = {}

    @classmethod
    def open(cls, path: str | Path) -> DataDir:
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise DataError(
                f"'{root}' is not a prepared data dir (no {MANIFEST}); "
                f"run `mixlab prepare --source ... --out {root}` first."
            )
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{mpath} is not valid JSON ({exc}); re-run `mixlab prepare`.") from None
        manifest = Manifest.from_json(data, str(mpath))
        self = cls(root, manifest)
        self.validate()
        return self

    def validate(self) -> None:
        """Check that every shard exists and has exactly the size the manifest says."""
        item = self.dtype.itemsize
        for d in self.manifest.domains:
            for info in d.splits.values():
                for sh in info.shards:
                    p = self.root / sh.bin
                    if not p.is_file():
                        raise DataError(f"shard {p} is missing; re-run `mixlab prepare`.")
                    if p.stat().st_size != sh.tokens * item:
                        raise DataError(
                            f"shard {p} is corrupt: {p.stat().st_size} bytes, expected "
                            f"{sh.tokens * item} ({sh.tokens} tokens of {self.dtype.name}); "
                            "re-run `mixlab prepare`."
                        )
                    idx_path = self.root / sh.idx
                    if not idx_path.is_file():
                        raise DataError(f"offsets file {idx_path} is missing; re-run `mixlab prepare`.")
                    try:
                        offsets = np.load(idx_path, mmap_mode="r")
                        ok = offsets.shape == (sh.docs + 1,) and int(offsets[-1]) == sh.tokens
                    except (ValueError, OSError):
                        ok = False
                    if not ok:
                        raise DataError(f"offsets file {idx_path} is corrupt; re-run `mixlab prepare`.")

    @property
    def domains(self) -> list[str]:
        return self.manifest.domain_names

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @property
    def eos_id(self) -> int:
        return self.manifest.eos_id

    def split(self, domain: str, split: str) -> DomainSplit:
        key = (domain, split)
        if key not in self._splits:
            info = self.manifest.domain(domain).splits.get(split)
            if info is None:
                raise DataError(f"domain '{domain}' has no '{split}' split in {self.root}.")
            self._splits[key] = DomainSplit(self.root, domain, split, info, self.dtype)
        return self._splits[key]

    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` saved with this data dir."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.root / TOKENIZER))


def open_if_current(out: Path, inputs_hash: str) -> DataDir | None:
    """The data dir at ``out`` if it is valid and was built from ``inputs_hash``, else None
    (so that re-running a build with the same inputs and options is a no-op)."""
    if not (Path(out) / MANIFEST).is_file():
        return None
    try:
        data = DataDir.open(out)
    except DataError:
        return None
    return data if data.manifest.inputs_hash == inputs_hash else None


def check_replaceable(out: Path) -> None:
    """Refuse to build over an existing, non-empty folder that is not a data dir."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out '{out}' is a file; give a folder for the data dir.")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise DataError(
            f"--out '{out}' exists and is not a mixlab data dir (no {MANIFEST}); refusing to "
            "replace it. Choose another folder or remove it."
        )
