"""Stage 1 of ``prepare``: stream the source, clean and filter, de-duplicate, spool to disk.

The main process reads the source (one stream: files in order, lines in order) and groups the
raw documents into batches of about ``read_batch_bytes``; workers clean each batch
(``clean_batch``: ``clean_text``, the empty/short filter, UTF-8 encoding, a 16-byte BLAKE2b
digest); the main process takes the results in reading order, drops exact duplicates (per
domain, by digest), stops a domain at its byte cap and appends the kept text to that domain's
spool file. Memory holds only the batches in flight and, per document, its spool offset
(8 bytes) and its digest (``DigestSet``: 27-53 bytes per distinct document).

Workers may read ahead of a capped domain; documents past the one that crossed the cap are
ignored entirely (not counted as read), so every count and every byte spooled is the same
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.data.parallel import OrderedPool
from mixlab.data.sources import RawDoc, TextSource
from mixlab.errors import DataError

EMPTY, SHORT = 0, 1
"""``clean_batch`` results for dropped documents (a kept one is a (bytes, digest, n) tuple)."""

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, int]:
    """Normalise newlines to ``\\n``, drop control characters (tab and newline stay) and byte-order
    marks, strip surrounding whitespace. Lone surrogates (from JSON escapes) cannot be written
    as UTF-8, so they become U+FFFD; returns (text, surrogates replaced).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    n_sur = 0
    if _SURROGATE.search(text):
        text, n_sur = _SURROGATE.subn("\ufffd", text)
    return text.strip(), n_sur


def clean_batch(task: tuple[list[str], int]) -> list[int | tuple[bytes, bytes, int]]:
    """Worker side of reading: for each raw text of ``task = (texts, min_chars)``, ``EMPTY``,
    ``SHORT`` (fewer than ``min_chars`` characters once cleaned), or (UTF-8 bytes, 16-byte
    BLAKE2b digest, surrogates replaced)."""
    texts, min_chars = task
    out: list[int | tuple[bytes, bytes, int]] = []
    for raw in texts:
        text, surrogates = clean_text(raw)
        if not text:
            out.append(EMPTY)
        elif len(text) < min_chars:
            out.append(SHORT)
        else:
            data = text.encode("utf-8")
            out.append((data, hashlib.blake2b(data, digest_size=16).digest(), surrogates))
    return out


class DigestSet:
    """A set of 16-byte digests: open addressing with linear probing over two uint64 arrays.

    A slot is 16 bytes and at most ``MAX_LOAD`` of the slots are used (the table doubles past
    it), so it costs 16 / 0.6 = 27 to 53 bytes per distinct digest, about a third of a Python
    ``set`` of ``bytes``; while it doubles, the old and the new table coexist. An all-zero slot
    means empty (an all-zero digest is kept apart). Digests are BLAKE2b outputs, so their low
    word is already uniform and serves as the hash.
    """

    MAX_LOAD = 0.6

    def __init__(self, capacity: int = 1024):
        cap = 1 << max(4, (capacity - 1).bit_length())
        self._hi = array("Q", bytes(8 * cap))
        self._lo = array("Q", bytes(8 * cap))
        self._n = 0
        self._zero = False

    def __len__(self) -> int:
        return self._n + self._zero

    @property
    def nbytes(self) -> int:
        """Bytes held by the table."""
        return 16 * len(self._hi)

    def add(self, digest: bytes) -> bool:
        """Insert ``digest`` (16 bytes); True if it was not there before."""
        hi, lo = struct.unpack("<QQ", digest)
        if hi == 0 and lo == 0:
            new, self._zero = not self._zero, True
            return new
        his, los = self._hi, self._lo
        mask = len(his) - 1
        i = lo & mask
        while True:
            h, v = his[i], los[i]
            if h == hi and v == lo:
                return False
            if h == 0 and v == 0:
                break
            i = (i + 1) & mask
        his[i], los[i] = hi, lo
        self._n += 1
        if self._n > self.MAX_LOAD * len(his):
            self._grow()
        return True

    def _grow(self) -> None:
        old_hi = np.frombuffer(self._hi, dtype=np.uint64)
        old_lo = np.frombuffer(self._lo, dtype=np.uint64)
        used = (old_hi != 0) | (old_lo != 0)
        key_hi, key_lo = old_hi[used], old_lo[used]
        cap = 2 * len(self._hi)
        hi = np.zeros(cap, dtype=np.uint64)
        lo = np.zeros(cap, dtype=np.uint64)
        mask = np.uint64(cap - 1)
        slot = key_lo & mask
        todo = np.arange(key_hi.size)
        # Vectorised linear probing: each round, every key still to place tries its slot; of
        # those aiming at the same free slot the first wins, the others and those that found
        # it taken move one slot on. A key passes a slot only once it is taken, so lookups
        # (which stop at the first empty slot) find every key.
        while todo.size:
            s = slot[todo]
            free = (hi[s] == 0) & (lo[s] == 0)
            firsts = np.unique(s[free], return_index=True)[1]
            won = np.flatnonzero(free)[firsts]
            hi[s[won]], lo[s[won]] = key_hi[todo[won]], key_lo[todo[won]]
            lost = np.ones(todo.size, dtype=bool)
            lost[won] = False
            todo = todo[lost]
            slot[todo] = (slot[todo] + np.uint64(1)) & mask
        self._hi = array("Q", hi.tobytes())
        self._lo = array("Q", lo.tobytes())


class Spool:
    """Cleaned UTF-8 documents of one domain in a scratch file; only offsets stay in memory."""

    def __init__(self, path: Path):
        self.path = path
        self._fh: Any = open(path, "wb")  # noqa: SIM115 (kept open across add() calls)
        self.offsets = array("q", [0])

    def add(self, data: bytes) -> None:
        self._fh.write(data)
        self.offsets.append(self.offsets[-1] + len(data))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def bytes(self) -> int:
        return self.offsets[-1]

    def read(self, order: Iterator[int] | np.ndarray, max_bytes: int = 0) -> Iterator[str]:
        """Documents in the given order of indices. With ``max_bytes`` > 0 a longer document is
        cut to a prefix of more than ``max_bytes`` bytes (on a character boundary), so a huge
        document is never read whole for a small sample, yet still reads as longer than any
        budget up to ``max_bytes`` (``bpe.balanced_sample`` then cuts it where it would have
        cut the whole)."""
        with open(self.path, "rb") as fh:
            for j in order:
                j = int(j)
                fh.seek(self.offsets[j])
                size = self.offsets[j + 1] - self.offsets[j]
                if max_bytes and size > max_bytes + 4:
                    # + 4: dropping a cut multi-byte character still leaves > max_bytes bytes.
                    yield fh.read(max_bytes + 4).decode("utf-8", errors="ignore")
                else:
                    yield fh.read(size).decode("utf-8")


@dataclass
class DomainIngest:
    """What reading one domain gave: its spool and the counts of dropped documents."""

    name: str
    spool: Spool
    read: int = 0
    empty: int = 0
    short: int = 0
    duplicate: int = 0
    replaced: int = 0
    bytes: int = 0
    capped: bool = False
    seen: DigestSet | None = field(default_factory=DigestSet)
    """Digests of the kept documents; dropped (None) once reading is over."""

    @property
    def dropped(self) -> int:
        return self.empty + self.short + self.duplicate


def _batches(
    source: TextSource, wants: Callable[[str], bool], min_chars: int, batch_bytes: int
) -> Iterator[tuple[list[tuple[str, int]], tuple[list[str], int], int]]:
    """Batches of the stream of about ``batch_bytes`` characters (a bound on UTF-8 bytes up to
    the few multi-byte characters): (per document (domain, replaced), (texts, min_chars),
    characters)."""
    meta: list[tuple[str, int]] = []
    texts: list[str] = []
    size = 0
    doc: RawDoc
    for doc in source.documents(wants):
        meta.append((doc.domain, doc.replaced))
        texts.append(doc.text)
        size += len(doc.text)
        if size >= batch_bytes:
            yield meta, (texts, min_chars), size
            meta, texts, size = [], [], 0
    if texts:
        yield meta, (texts, min_chars), size


def ingest(
    source: TextSource,
    *,
    domains: list[str],
    min_chars: int,
    max_bytes: int,
    scratch: Path,
    pool: OrderedPool,
    batch_bytes: int,
    progress: bool = False,
) -> dict[str, DomainIngest]:
    """Read ``source`` into one spool per domain under ``scratch`` (see the module docstring).

    ``domains``: only these (empty = all); ``max_bytes``: per-domain cap on kept UTF-8 bytes
    (0 = none; the document that crosses it is kept).
    """
    from tqdm import tqdm

    wanted = set(domains)
    states: dict[str, DomainIngest] = {}

    def wants(domain: str) -> bool:
        if wanted and domain not in wanted:
            return False
        st = states.get(domain)
        return st is None or not st.capped

    bar = tqdm(desc="reading", unit="doc", file=sys.stderr, disable=True if not progress else None)
    try:
        batches = _batches(source, wants, min_chars, batch_bytes)
        for meta, results in pool.map(clean_batch, batches):
            bar.update(len(meta))
            for (domain, replaced), res in zip(meta, results):
                st = states.get(domain)
                if st is None:
                    st = states[domain] = DomainIngest(domain, Spool(scratch / f"{domain}.txt"))
                if st.capped:
                    continue  # read ahead of the cap: as if never read
                st.read += 1
                if res == EMPTY:
                    st.empty += 1
                    continue
                if res == SHORT:
                    st.short += 1
                    continue
                assert isinstance(res, tuple)
                data, digest, surrogates = res
                assert st.seen is not None
                if not st.seen.add(digest):
                    st.duplicate += 1
                    continue
                st.spool.add(data)
                st.bytes += len(data)
                st.replaced += replaced + surrogates
                if max_bytes and st.bytes >= max_bytes:
                    st.capped = True
    finally:
        bar.close()
        for st in states.values():
            st.spool.close()
            st.seen = None
    return states


def check_ingest(
    states: dict[str, DomainIngest], source: TextSource, domains: list[str], min_chars: int
) -> list[str]:
    """The domains to write, in source order; errors for missing or emptied domains."""
    known = source.domains if source.domains is not None else sorted(states)
    missing = [d for d in domains if d not in known]
    if missing:
        raise DataError(
            f"domain(s) {', '.join(missing)} not found in {source.label}; it has: "
            f"{', '.join(known) or 'no domain'}."
        )
    names = [d for d in known if (not domains or d in domains)]
    if not names:
        raise DataError(f"source {source.label} holds no document.")
    for d in names:
        st = states.get(d)
        if st is None or st.read == 0:
            raise DataError(f"domain '{d}' in {source.label} is empty: it has no document.")
        if len(st.spool) == 0:
            raise DataError(
                f"domain '{d}' has no document left after filtering: of {st.read} read, "
                f"{st.empty} were empty, {st.short} shorter than min_chars={min_chars}, "
                f"{st.duplicate} duplicates. Lower --min-chars or check the text field."
            )
    return names
