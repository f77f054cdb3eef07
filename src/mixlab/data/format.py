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

Integrity. The manifest records the sha256 of every shard's token and offsets files
(``ShardInfo.sha256``, ``idx_sha256``), computed by ``ShardWriter`` on the bytes it writes, so
``prepare``, ``cluster`` and ``select`` all record them. ``DataDir.open`` always checks the
manifest (types, ranges, counts), that every file exists with the size the manifest says, and
the offsets' shape; when the shards total at most ``FULL_CHECK_BYTES`` it also reads every file
once and checks its sha256 and that every token id is below ``vocab_size``. Measured on one
shared core with SHA-NI, a 20 MB shard: the full check 25-50 ms on open (sha256 alone 17-21 ms,
~1 GB/s; blake2b was 2x slower there, xxhash is not a dependency), the size check 0.5 ms, and
hashing while writing adds 21 ms to ShardWriter's 152 ms. A process that opens the same data
dir again skips files it has read unchanged (``_SCANNED``). ``mixlab verify DIR`` does the full
check at any size. Data dirs written before checksums existed still open (sizes and token ids are
checked; ``DataDir.notes`` says their bytes cannot be), and rebuilding them adds checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import numpy as np

from mixlab.errors import DataError

FORMAT_NAME = "mixlab-data"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
DTYPES = ("uint16", "uint32")
"""The token dtypes a data dir may use."""

FULL_CHECK_BYTES = 1 << 30
"""``DataDir.open`` reads and hashes every shard when they total at most this many bytes: 1-1.5 s
at the 0.7-1 GB/s measured for sha256 + max id on one core (see the module docstring).
Larger data dirs get the manifest, size and offsets checks; ``mixlab verify DIR`` reads them."""

Check = Literal["auto", "full", "size"]
"""How much ``DataDir.open`` checks: 'size' = the manifest, every file's size and the offsets'
shape; 'full' = also every byte (sha256) and every token id; 'auto' = 'full' up to
``FULL_CHECK_BYTES`` of shards, else 'size'."""

_READ_CHUNK = 1 << 23
"""8 MiB reads while hashing: a multiple of every itemsize, large enough to amortise calls."""

_SCANNED: dict[tuple[Any, ...], int] = {}
"""Shards this process has already read in full (key: path, size, mtime and inode of both files,
expected hashes) -> their largest token id, so that opening one data dir many times in one process (compare,
sweep, a reference model) reads it once. A file changed in between has another mtime."""


def _scan_file(path: Path, dtype: np.dtype | None, digest: bool) -> tuple[str, int]:
    """(sha256 hex, or '' when not ``digest``; largest element as ``dtype``, or -1) in one
    sequential read of ``path`` through a fixed 8 MiB buffer (memory stays flat)."""
    h = hashlib.sha256() if digest else None
    top = -1
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            if h is not None:
                h.update(view[:n])  # releases the GIL: shards hash in parallel threads
            if dtype is not None:
                top = max(top, int(np.frombuffer(view[:n], dtype=dtype).max()))
    return (h.hexdigest() if h is not None else ""), top


def _save_npy(path: Path, array: np.ndarray) -> str:
    """``np.save`` ``array`` to ``path``; returns the sha256 of the bytes written."""
    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


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
    sha256: str = ""
    """sha256 (hex) of the token file; '' in data dirs written before checksums."""
    idx_sha256: str = ""
    """sha256 (hex) of the offsets file; '' in data dirs written before checksums."""


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
        """The manifest in ``data`` (parsed ``manifest.json``), checked field by field: a wrong
        type, a value out of range or counts that do not add up raise ``DataError`` naming
        ``where`` and the command that rebuilds the data dir."""
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise DataError(f"{where} is not a mixlab data manifest.")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"{where} was written in data format version {version}; this mixlab reads "
                f"version {FORMAT_VERSION}. Re-run `mixlab prepare` to rebuild the data dir."
            )
        _check_manifest_fields(data, where)
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
        except (KeyError, TypeError, AttributeError) as exc:
            raise DataError(
                f"{where} is damaged or incomplete ({exc}); {rebuild_hint(data.get('command'))}."
            ) from None


def rebuild_hint(command: Any) -> str:
    """How to rebuild a data dir: the command its manifest records, else the generic advice."""
    if isinstance(command, str) and command.strip():
        return f"re-run `{command.strip()}` to rebuild the data dir"
    return "re-run `mixlab prepare` (or the `mixlab cluster` / `mixlab select` that wrote it)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and (
        value == "" or (len(value) == 64 and all(c in "0123456789abcdef" for c in value))
    )


def _inside(rel: Any) -> bool:
    """A relative path that stays inside the data dir (no absolute path, no '..')."""
    if not isinstance(rel, str) or not rel:
        return False
    p = Path(rel)
    return not p.is_absolute() and ".." not in p.parts


def _check_manifest_fields(data: dict[str, Any], where: str) -> None:
    """Raise ``DataError`` for the first field of a parsed manifest with a wrong type or value.

    Readers trust these fields (``vocab_size`` sizes the embedding, ``dtype`` reads the shards,
    token counts weight the domains), so each one is checked here, once."""
    fix = rebuild_hint(data.get("command"))

    def bad(what: str) -> NoReturn:
        raise DataError(f"{where}: {what}; the manifest is damaged: {fix}.")

    vocab = data.get("vocab_size")
    if not _is_int(vocab) or vocab < 1:
        bad(f"vocab_size must be a positive integer, got {vocab!r}")
    dtype = data.get("dtype")
    if dtype not in DTYPES:
        bad(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
    if vocab > 2 ** (8 * np.dtype(dtype).itemsize):
        bad(f"vocab_size {vocab} does not fit dtype {dtype!r}")
    eos = data.get("eos_id")
    if not _is_int(eos) or not 0 <= eos < vocab:
        bad(f"eos_id must be an integer in [0, vocab_size = {vocab}), got {eos!r}")
    if not _is_sha256(data.get("tokenizer_sha256", "")):
        bad(f"tokenizer_sha256 must be a sha256 hex string, got {data.get('tokenizer_sha256')!r}")
    if not isinstance(data.get("extra", {}), dict):
        bad("extra must be a table")
    domains = data.get("domains")
    if not isinstance(domains, list) or not domains:
        bad(f"domains must be a non-empty list, got {domains!r}")
    names: set[str] = set()
    for d in domains:
        name = d.get("name") if isinstance(d, dict) else None
        if not isinstance(name, str) or not name:
            bad(f"every domain needs a name, got {d!r:.80}")
        if name in names:
            bad(f"domain '{name}' is listed twice")
        names.add(name)
        splits = d.get("splits")
        if not isinstance(splits, dict):
            bad(f"domain '{name}': splits must be a table")
        for split, info in splits.items():
            at = f"domain '{name}' split '{split}'"
            if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
                bad(f"{at} must be a table with a list of shards")
            sums = {"docs": 0, "tokens": 0}
            for k, sh in enumerate(info["shards"]):
                if not isinstance(sh, dict):
                    bad(f"{at}: shard {k} must be a table")
                for key in ("bin", "idx"):
                    if not _inside(sh.get(key)):
                        bad(f"{at}: shard {k} {key} must be a path inside the data dir, "
                            f"got {sh.get(key)!r}")
                for key in ("sha256", "idx_sha256"):
                    if not _is_sha256(sh.get(key, "")):
                        bad(f"{at}: shard {sh['bin']} {key} must be a sha256 hex string")
                for key in sums:
                    value = sh.get(key)
                    if not _is_int(value) or value < 0:
                        bad(f"{at}: shard {sh['bin']} {key} must be a non-negative integer, "
                            f"got {value!r}")
                    sums[key] += value
            for key, total in sums.items():
                value = info.get(key)
                if not _is_int(value) or value < 0:
                    bad(f"{at}: {key} must be a non-negative integer, got {value!r}")
                if value != total:
                    bad(f"{at}: {key} = {value} but its shards hold {total}")


_NPY_LOCK = threading.Lock()


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of a .npy file, one thread at a time: numpy parses the header with
    ``ast.literal_eval``, and CPython 3.11's compiler keeps global state that concurrent calls
    corrupt ("AST constructor recursion depth mismatch", seen in CI when shards are verified
    in parallel threads)."""
    with _NPY_LOCK:
        return np.load(path, mmap_mode=mmap_mode)


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
    h = hashlib.sha256()
    with open(bin_path, "wb") as fh:
        for d in docs:
            b = np.asarray(d, dtype=dtype).tobytes()
            fh.write(b)
            h.update(b)
    rel_idx = rel_bin[: -len(".bin")] + ".idx.npy"
    idx_sha = _save_npy(root / rel_idx, offsets)
    return ShardInfo(rel_bin, rel_idx, len(docs), int(offsets[-1]), h.hexdigest(), idx_sha)


class ShardWriter:
    """Append documents to a domain split, rolling over to a new shard past ``max_tokens``."""

    def __init__(self, root: Path, domain: str, split: str, dtype: np.dtype, max_tokens: int = 0):
        self.root, self.domain, self.split, self.dtype = Path(root), domain, split, dtype
        self.max_tokens = max_tokens
        self.info = SplitInfo()
        self._fh: Any = None
        self._hash: Any = None
        self._offsets: list[int] = [0]
        self._rel_bin = ""

    def _open(self) -> None:
        self._rel_bin = f"shards/{self.domain}/{self.split}-{len(self.info.shards):05d}.bin"
        path = self.root / self._rel_bin
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in _close(), spans many add() calls
        # Hash the bytes as they are written: the checksum costs no second read of the shard.
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        rel_idx = self._rel_bin[: -len(".bin")] + ".idx.npy"
        idx_sha = _save_npy(self.root / rel_idx, np.asarray(self._offsets, dtype=np.int64))
        docs, tokens = len(self._offsets) - 1, self._offsets[-1]
        info = ShardInfo(self._rel_bin, rel_idx, docs, tokens, self._hash.hexdigest(), idx_sha)
        self.info.shards.append(info)
        self.info.docs += docs
        self.info.tokens += tokens
        self._fh = None

    def add(self, ids: np.ndarray) -> None:
        """Append one document's token ids (ending in EOS)."""
        if self._fh is None:
            self._open()
        data = np.asarray(ids, dtype=self.dtype).tobytes()
        self._fh.write(data)
        self._hash.update(data)
        self._offsets.append(self._offsets[-1] + len(ids))
        if self.max_tokens and self._offsets[-1] >= self.max_tokens:
            self._close()

    def close(self) -> SplitInfo:
        self._close()
        return self.info


class DomainSplit:
    """Read access to the windows and documents of one domain split, through memmaps."""

    def __init__(
        self, root: Path, domain: str, split: str, info: SplitInfo, dtype: np.dtype,
        vocab_size: int = 0,
    ):
        self.root, self.domain, self.split, self.info, self.dtype = root, domain, split, info, dtype
        self.vocab_size = vocab_size
        """Token ids read must be below this (0 = unchecked); a bigger one raises DataError."""
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
            o = load_npy(self.root / self.info.shards[s].idx, mmap_mode="r")
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
        if self.vocab_size and out.size and int(out.max()) >= self.vocab_size:
            # Reached only when open did not read the shards (a data dir above FULL_CHECK_BYTES):
            # one max over the rows read, so an id the embedding cannot look up is named here.
            row = int(np.argmax(out.max(axis=1) >= self.vocab_size))
            self._out_of_range(int(shard[row]), int(out[row].max()))
        return out

    def _out_of_range(self, s: int, token: int) -> NoReturn:
        raise DataError(
            f"shard {self.root / self.info.shards[s].bin} holds token id {token} but "
            f"{self.root / MANIFEST} says vocab_size {self.vocab_size}: the shard or the manifest "
            f"is corrupt; run `mixlab verify {self.root}`, then rebuild the data dir."
        )

    def document(self, j: int) -> np.ndarray:
        """Token ids of document ``j`` (global across shards), EOS included."""
        for s, sh in enumerate(self.info.shards):
            if j < sh.docs:
                o = self.offsets(s)
                doc = np.asarray(self._map(s)[int(o[j]) : int(o[j + 1])], dtype=np.int64)
                if self.vocab_size and doc.size and int(doc.max()) >= self.vocab_size:
                    self._out_of_range(s, int(doc.max()))
                return doc
            j -= sh.docs
        raise DataError(f"document index out of range for {self.domain}/{self.split}.")


class DataDir:
    """An opened, validated data dir. ``DataDir.open(path)`` checks the manifest and every shard
    (see the module docstring for what ``check`` reads and what it costs)."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self.dtype = np.dtype(manifest.dtype)
        self._splits: dict[tuple[str, str], DomainSplit] = {}
        self.notes: list[str] = []
        """What the last ``validate`` could not check (no checksums, too large to read on
        open), one sentence each, for the caller to show."""

    @classmethod
    def read(cls, path: str | Path) -> DataDir:
        """The data dir at ``path`` with its manifest parsed and checked, its files not yet."""
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
        return cls(root, Manifest.from_json(data, str(mpath)))

    @classmethod
    def open(cls, path: str | Path, check: Check = "auto") -> DataDir:
        """Read and validate the data dir at ``path``; a problem raises ``DataError``."""
        self = cls.read(path)
        self.validate(check)
        return self

    def shards(self) -> list[ShardInfo]:
        return [sh for d in self.manifest.domains for i in d.splits.values() for sh in i.shards]

    @property
    def shard_bytes(self) -> int:
        return sum(sh.tokens for sh in self.shards()) * self.dtype.itemsize

    def validate(self, check: Check = "auto") -> None:
        """Raise ``DataError`` with the first of ``problems(check)``."""
        found = self.problems(check)
        if found:
            more = f" ({len(found) - 1} more: `mixlab verify {self.root}`)" if len(found) > 1 else ""
            raise DataError(found[0] + more)

    def problems(self, check: Check = "full") -> list[str]:
        """Every problem found, one line each (empty: the data dir is sound).

        'size': every file exists, has the size the manifest says, and the offsets have
        docs + 1 entries ending at the token count. 'full' also reads every file once: its
        sha256 must equal the manifest's, every token id must be below ``vocab_size``, the
        offsets must start at 0 and never decrease, the tokenizer must match its sha256.
        'auto' is 'full' when the shards total at most ``FULL_CHECK_BYTES``. Sets ``notes``."""
        m = self.manifest
        fix = rebuild_hint(m.command)
        item = self.dtype.itemsize
        shards = self.shards()
        found: list[str] = []
        sized: list[ShardInfo] = []  # shards whose files have the right sizes: safe to read
        for sh in shards:
            p, idx_path = self.root / sh.bin, self.root / sh.idx
            if not p.is_file():
                found.append(f"shard {p} is missing; {fix}.")
                continue
            if p.stat().st_size != sh.tokens * item:
                found.append(
                    f"shard {p} is corrupt: {p.stat().st_size} bytes, expected "
                    f"{sh.tokens * item} ({sh.tokens} tokens of {self.dtype.name}); {fix}."
                )
                continue
            if not idx_path.is_file():
                found.append(f"offsets file {idx_path} is missing; {fix}.")
                continue
            try:
                offsets = load_npy(idx_path, mmap_mode="r")
                ok = offsets.shape == (sh.docs + 1,) and int(offsets[-1]) == sh.tokens
            except (ValueError, OSError, EOFError):
                ok = False
            if not ok:
                found.append(f"offsets file {idx_path} is corrupt; {fix}.")
                continue
            sized.append(sh)
        self.notes = []
        total = self.shard_bytes
        full = check == "full" or (check == "auto" and total <= FULL_CHECK_BYTES)
        if not full:
            if check == "auto":
                self.notes.append(
                    f"{self.root}: {total / 1e9:.1f} GB of shards, more than the "
                    f"{FULL_CHECK_BYTES / 1e9:.1f} GB read on open: sizes and offsets were "
                    f"checked, not the bytes; `mixlab verify {self.root}` checks every byte."
                )
            return found
        unhashed = sum(1 for sh in shards if not sh.sha256)
        if unhashed:
            self.notes.append(
                f"{self.root}: {unhashed} of {len(shards)} shards have no checksum (written "
                "before mixlab recorded them): sizes and token ids were checked, the bytes cannot "
                f"be; {fix} to add checksums."
            )
        workers = max(1, min(4, os.cpu_count() or 1, len(sized)))
        with ThreadPoolExecutor(workers) as pool:
            found += [x for x in pool.map(self._check_shard, sized, [check] * len(sized)) if x]
        sha = m.tokenizer_sha256
        tok = self.root / TOKENIZER
        if sha and not tok.is_file():
            found.append(f"tokenizer {tok} is missing; {fix}.")
        elif sha:
            try:
                digest = _scan_file(tok, None, True)[0]
            except OSError as exc:
                digest = f"unreadable ({exc})"
            if digest != sha:
                found.append(f"tokenizer {tok} is corrupt: its sha256 is not the manifest's; {fix}.")
        return found

    def _check_shard(self, sh: ShardInfo, check: Check) -> str:
        """One line for the first problem of a shard whose sizes are right, or ''."""
        try:
            return self._read_shard(sh, check)
        except (OSError, ValueError, EOFError) as exc:  # unreadable: permissions, I/O error
            return f"shard {self.root / sh.bin} cannot be read ({exc}); {rebuild_hint(self.manifest.command)}."

    def _read_shard(self, sh: ShardInfo, check: Check) -> str:
        fix = rebuild_hint(self.manifest.command)
        p, idx_path = self.root / sh.bin, self.root / sh.idx
        st, ist = p.stat(), idx_path.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, ist.st_size,
               ist.st_mtime_ns, ist.st_ino, sh.sha256, sh.idx_sha256)  # fmt: skip
        top = _SCANNED.get(key) if check == "auto" else None
        if top is None:
            digest, top = _scan_file(p, self.dtype, bool(sh.sha256))
            if digest != sh.sha256:
                return (
                    f"shard {p} is corrupt: its sha256 is not the one {MANIFEST} recorded (its "
                    f"bytes changed after it was written); {fix}."
                )
            if sh.idx_sha256 and _scan_file(idx_path, None, True)[0] != sh.idx_sha256:
                return f"offsets file {idx_path} is corrupt: its sha256 is not the manifest's; {fix}."
            offsets = load_npy(idx_path)
            if int(offsets[0]) != 0 or bool((np.diff(offsets) < 0).any()):
                return f"offsets file {idx_path} is corrupt: offsets must rise from 0; {fix}."
            _SCANNED[key] = top
        if top >= self.manifest.vocab_size:
            return (
                f"shard {p} holds token id {top} but {self.root / MANIFEST} says vocab_size "
                f"{self.manifest.vocab_size} (ids must be below it): the shard or the manifest is "
                f"corrupt; {fix}."
            )
        return ""

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
            self._splits[key] = DomainSplit(
                self.root, domain, split, info, self.dtype, self.vocab_size
            )
        return self._splits[key]

    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` saved with this data dir."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.root / TOKENIZER))


def open_if_current(out: Path, inputs_hash: str) -> DataDir | None:
    """The data dir at ``out`` if it is sound (every byte checked), has a checksum for every
    shard and was built from ``inputs_hash``, else None: re-running a build with the same inputs
    and options is a no-op, and re-running it over a damaged or pre-checksum dir rebuilds it."""
    if not (Path(out) / MANIFEST).is_file():
        return None
    try:
        data = DataDir.open(out, check="full")
    except DataError:
        return None
    if data.manifest.inputs_hash != inputs_hash or any(not sh.sha256 for sh in data.shards()):
        return None
    return data


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
