"""Stage 4 of ``prepare``: spooled documents -> token shards, in worker processes.

Each domain's spool is cut into tasks of consecutive documents (about ``encode_task_bytes`` of
text each). A worker reads its task's bytes straight from the spool file (no text crosses a
pipe), encodes document by document on one core, and sends back the ids (``dtype`` of the data
dir) and the length of each document, EOS included. The main process takes the results in
order and appends each document to the shard writer of its split, so the shards are the same
whatever the number of workers or the task sizes.

A document longer than ``piece_bytes`` is encoded in pieces cut where the tokenizer's regex
always cuts (``tokenizer.cut_point``), which gives exactly the ids of the whole document, so
encoding memory is bounded by the piece size, not the document size. Tokenizers for which that
is not proven (``tokenizer.cuts_exactly``) encode every document whole.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixlab.data import tokenizer as bpe
from mixlab.data.format import SPLITS, ShardWriter, SplitInfo
from mixlab.data.ingest import DomainIngest
from mixlab.data.parallel import BufferPlan, OrderedPool


@dataclass(frozen=True)
class EncodeJob:
    """What every encoding task of one ``prepare`` run shares."""

    tokenizer: str
    """Path of the tokenizer.json to encode with."""
    tokenizer_sha256: str
    """Its hash: a worker reloads when it changes, whatever the path."""
    eos_token: str
    dtype: str
    """numpy dtype name of the ids written (uint16 or uint32)."""
    piece_bytes: int
    """Longest text encoded in one call when the tokenizer can be cut exactly."""
    cut: bool
    """Whether long documents may be cut (``tokenizer.cuts_exactly``)."""


@dataclass(frozen=True)
class EncodeTask:
    job: EncodeJob
    spool: str
    """Path of the domain's spool file."""
    offsets: np.ndarray
    """[k + 1] int64 byte offsets in the spool of the task's k documents."""


_TOKENIZERS: dict[tuple[str, str, str], tuple[Any, int]] = {}


def _tokenizer(job: EncodeJob) -> tuple[Any, int]:
    """(tokenizer, EOS id), loaded once per process and tokenizer file."""
    key = (job.tokenizer, job.tokenizer_sha256, job.eos_token)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()  # one run at a time: do not keep a previous run's tokenizer
        tok = bpe.load_tokenizer(job.tokenizer, job.eos_token)
        _TOKENIZERS[key] = (tok, bpe.eos_id(tok, job.eos_token))
    return _TOKENIZERS[key]


def _pieces(fh: Any, start: int, end: int, job: EncodeJob) -> Iterator[str]:
    """The text of the document at bytes [start, end) of ``fh``, in pieces that encode exactly
    as the whole: one piece when it is short or the tokenizer cannot be cut; else pieces of at
    most ``piece_bytes``, longer only where the text has no cut place for that long."""
    fh.seek(start)
    if end - start <= job.piece_bytes or not job.cut:
        yield fh.read(end - start).decode("utf-8")
        return
    buf, left = b"", end - start
    while buf or left:
        if len(buf) + left <= job.piece_bytes:
            yield (buf + fh.read(left)).decode("utf-8")
            return
        take = min(left, job.piece_bytes + 8 - len(buf))  # + 8: the character after a cut
        if take > 0:
            buf += fh.read(take)
            left -= take
        p = bpe.cut_point(buf, job.piece_bytes)
        while p is None and left:
            # No cut place in the first piece_bytes: read on until there is one.
            take = min(left, max(len(buf), job.piece_bytes))
            buf += fh.read(take)
            left -= take
            p = bpe.cut_point(buf, len(buf))
        if p is None:
            yield buf.decode("utf-8")
            return
        yield buf[:p].decode("utf-8")
        buf = buf[p:]


def encode_task(task: EncodeTask) -> tuple[np.ndarray, np.ndarray]:
    """Worker side of encoding: (lengths [k] int64, ids [sum(lengths)] ``job.dtype``) of the
    task's k documents, each ending in EOS."""
    job = task.job
    tok, eos = _tokenizer(job)
    dtype = np.dtype(job.dtype)
    offsets = task.offsets
    docs: list[np.ndarray] = []
    with open(task.spool, "rb") as fh:
        for j in range(len(offsets) - 1):
            parts = [
                np.array(bpe.encode_text(tok, text), dtype=dtype)
                for text in _pieces(fh, int(offsets[j]), int(offsets[j + 1]), job)
            ]
            parts.append(np.array([eos], dtype=dtype))
            docs.append(np.concatenate(parts))
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    return lengths, np.concatenate(docs)


def _tasks(
    states: dict[str, DomainIngest], names: list[str], job: EncodeJob, task_bytes: int
) -> Iterator[tuple[tuple[str, int], EncodeTask, int]]:
    """((domain, first document), task, bytes) over every domain's spool, in order."""
    for d in names:
        spool = states[d].spool
        offsets = np.frombuffer(spool.offsets, dtype=np.int64)
        # Cut where the running byte count crosses a multiple of task_bytes: tasks of about
        # task_bytes, a long document alone in its own.
        marks = np.searchsorted(offsets, np.arange(task_bytes, offsets[-1], task_bytes))
        bounds = np.unique(np.concatenate([[0], marks, [len(offsets) - 1]]))
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            chunk = offsets[a : b + 1].copy()
            yield (d, a), EncodeTask(job, str(spool.path), chunk), int(chunk[-1] - chunk[0])


def encode_domains(
    states: dict[str, DomainIngest],
    names: list[str],
    labels: dict[str, np.ndarray],
    job: EncodeJob,
    *,
    out: Path,
    shard_tokens: int,
    pool: OrderedPool,
    plan: BufferPlan,
    progress: bool = False,
) -> tuple[dict[str, dict[str, SplitInfo]], float]:
    """Encode every domain's spool into shards under ``out``; returns the split infos per
    domain and the seconds it took. ``labels[d]`` [docs] gives each document's split index."""
    from tqdm import tqdm

    total = sum(states[d].bytes for d in names)
    dtype = np.dtype(job.dtype)
    infos: dict[str, dict[str, SplitInfo]] = {}
    writers: dict[str, ShardWriter] = {}
    current = ""

    def finish(domain: str) -> None:
        infos[domain] = {s: w.close() for s, w in writers.items()}
        writers.clear()

    t0 = time.perf_counter()
    with tqdm(
        total=total,
        desc="encoding",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=True if not progress else None,
    ) as bar:
        tasks = _tasks(states, names, job, plan.encode_task_bytes)
        for (domain, first), (lengths, ids) in pool.map(encode_task, tasks):
            if domain != current:
                if current:
                    finish(current)
                current = domain
                writers.update(
                    {s: ShardWriter(out, domain, s, dtype, shard_tokens) for s in SPLITS}
                )
            split = labels[domain]
            ends = np.cumsum(lengths)
            for k, (a, b) in enumerate(zip((ends - lengths).tolist(), ends.tolist())):
                writers[SPLITS[split[first + k]]].add(ids[a:b])
            offsets = states[domain].spool.offsets
            bar.update(offsets[first + len(lengths)] - offsets[first])
        if current:
            finish(current)
    # Tasks that ran in this process cached the tokenizer; do not keep it after the run.
    _TOKENIZERS.clear()
    return infos, time.perf_counter() - t0
