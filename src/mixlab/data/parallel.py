"""Worker processes for ``prepare``: an ordered, bounded map over tasks, and the buffer plan.

``OrderedPool.map`` hands tasks to worker processes and yields their results in the order the
tasks were given, with at most ``depth`` tasks alive at once; whatever the number of workers,
the consumer sees the same sequence, so the output of ``prepare`` does not depend on it. With
one worker everything runs in the calling process.

``BufferPlan`` turns the memory cap (``--memory-mb``) into batch sizes. The cap bounds the text
and token buffers in flight, in all processes together; it does not count each interpreter's
own memory (about 28 MB of anonymous memory per worker, tokenizer loaded),
the tokenizer and its cache of recent words (~1 MB per worker), the tokenizer training sample,
or the few bytes per document that ``prepare`` keeps (see ``docs/large_corpus.md``). Reading
and encoding each get half of the cap: memory the main process frees after reading is not
always returned to the OS, so the two stages' peaks can add up. The factors below are the
peak bytes of memory per byte of text while a task is alive, with a margin; they were
measured on English-like text and assume at most one token per 2 bytes.

Workers are started with the ``spawn`` method: a fresh interpreter, no state copied from the
parent (forking a process whose Rust thread pool already ran can deadlock).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

from mixlab.errors import DataError

DEFAULT_MAX_WORKERS = 4
"""``workers = 0`` uses this many processes at most, each an interpreter of its own (~28 MB);
more can be asked for: encoding (~3 MB/s a core) is 15-25x slower than the main process's
reading and cleaning, so more workers keep helping while cores are free."""
AUTO_START_BYTES = 8_000_000
"""With ``workers = 0``, workers start only once this much text has gone through: a smaller
corpus is done in-process sooner than interpreters can start."""
MIN_MEMORY_MB = 8.0
"""Smallest cap accepted: below it the costs that do not scale with the cap (each worker's
tokenizer cache, the executor's queues: ~3 MB measured) are most of what a run adds."""

READ_FACTOR = 6
"""Reading: a batch of raw texts is held by the main process until its result is back, pickled,
unpickled in the worker, cleaned and encoded to UTF-8 there, pickled back and unpickled."""
ENCODE_FACTOR = 72
"""Encoding one piece: its UTF-8 bytes and str (up to 2 bytes a character), the tokenizer's
per-token ``Encoding`` (~95 bytes a token, measured) and the list of ids (~36 bytes a token),
at up to 0.5 tokens per byte."""
RESULT_FACTOR = 6
"""A task's token ids (up to 0.5 a byte, 4 bytes each): the worker's arrays and their join,
the pickled result, and the copy the main process unpickles."""
MIN_TASK_BYTES = 4096
MAX_TASK_BYTES = 4_000_000
"""Larger tasks buy nothing: sending a task costs well under a millisecond, encoding 4 MB of
text takes about a second."""

M = TypeVar("M")
P = TypeVar("P")
R = TypeVar("R")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_workers(requested: int) -> int:
    """The number of processes for ``workers = requested`` (0 = min(CPUs, 4))."""
    if requested < 0:
        raise DataError(f"workers must be >= 0 (0 = automatic), got {requested}.")
    return requested or min(available_cpus(), DEFAULT_MAX_WORKERS)


def _clamp(n: float) -> int:
    return int(min(max(n, MIN_TASK_BYTES), MAX_TASK_BYTES))


@dataclass(frozen=True)
class BufferPlan:
    """Batch sizes, in bytes of UTF-8 text, that keep the buffers in flight under a cap.

    With ``depth`` tasks alive at once: reading has half the cap for ``depth`` batches;
    encoding has the other half, a quarter of the cap for the pieces being encoded (one per
    worker) and a quarter for the results in flight. Batch sizes change how work is cut into
    tasks, never the output.
    """

    memory_bytes: int
    workers: int
    depth: int
    """Tasks alive at once: two per worker (one running, one queued), one in-process."""
    read_batch_bytes: int
    """Raw text per reading task."""
    encode_task_bytes: int
    """Text per encoding task (consecutive documents of one domain)."""
    piece_bytes: int
    """Longest text encoded in one call; longer documents are cut (when that is exact)."""

    @classmethod
    def from_cap(cls, memory_mb: float, workers: int) -> BufferPlan:
        """The plan for ``memory_mb`` MB (10^6 bytes) shared by ``workers`` processes."""
        if memory_mb < MIN_MEMORY_MB:
            raise DataError(f"memory_mb must be at least {MIN_MEMORY_MB:g}, got {memory_mb:g}.")
        total = int(memory_mb * 1e6)
        depth = 2 * workers if workers > 1 else 1
        task = _clamp(total / 4 / (depth * RESULT_FACTOR))
        return cls(
            memory_bytes=total,
            workers=workers,
            depth=depth,
            read_batch_bytes=_clamp(total / 2 / (depth * READ_FACTOR)),
            encode_task_bytes=task,
            piece_bytes=min(task, _clamp(total / 4 / (workers * ENCODE_FACTOR))),
        )


def _worker_init() -> None:
    # One core per worker: the tokenizer's Rust thread pool would otherwise start a thread per
    # CPU in every worker. Ctrl-C is the main process's to handle; it shuts the pool down.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class OrderedPool:
    """``map(fn, items)`` over worker processes, results in order, at most ``depth`` in flight.

    ``workers = 1`` runs every task in the calling process. ``start_after_bytes`` > 0 also runs
    tasks in-process until that many bytes of tasks have gone through, and only then starts the
    workers (for ``workers = 0``: small corpora do not pay for starting interpreters).
    Use as a context manager: leaving it stops the workers (waiting for running tasks).
    """

    def __init__(self, workers: int, depth: int, start_after_bytes: int = 0):
        self.workers = workers
        self.depth = max(1, depth)
        self.start_after_bytes = start_after_bytes
        self._seen = 0
        self._executor: ProcessPoolExecutor | None = None

    @property
    def started(self) -> bool:
        """Whether worker processes are running."""
        return self._executor is not None

    def _submit_to_pool(self, size: int) -> bool:
        if self.workers <= 1:
            return False
        if self._executor is None:
            self._seen += size
            if self._seen <= self.start_after_bytes:
                return False
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
            )
        return True

    def map(self, fn: Callable[[P], R], items: Iterable[tuple[M, P, int]]) -> Iterator[tuple[M, R]]:
        """Yield ``(meta, fn(payload))`` for each ``(meta, payload, size)`` of ``items``, in order.

        ``fn`` must be a module-level function (it is sent to the workers by name); ``meta``
        stays in this process; ``size`` (bytes) only decides when workers start. ``items`` is
        pulled lazily, ``depth`` ahead of the consumer.
        """
        pending: deque[tuple[M, Future[R]]] = deque()
        try:
            for meta, payload, size in items:
                if not self._submit_to_pool(size):
                    # Only reached before the pool starts, so nothing is pending: order holds.
                    yield meta, fn(payload)
                    continue
                assert self._executor is not None
                pending.append((meta, self._executor.submit(fn, payload)))
                while len(pending) >= self.depth:
                    yield self._next(pending)
            while pending:
                yield self._next(pending)
        finally:
            for _, fut in pending:
                fut.cancel()

    @staticmethod
    def _next(pending: deque[tuple[M, Future[R]]]) -> tuple[M, R]:
        meta, fut = pending.popleft()
        try:
            return meta, fut.result()
        except BrokenProcessPool:
            raise DataError(
                "a prepare worker process died: out of memory (lower --workers or "
                "--memory-mb), or a script called prepare() with workers > 1 outside "
                '`if __name__ == "__main__":` (see the error above).'
            ) from None

    def close(self) -> None:
        """Stop the workers; tasks not started are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- measuring memory (Linux) ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _anonymous_bytes(pid: int) -> int:
    """Anonymous resident memory of ``pid`` (``RssAnon``): heap, arrays and buffers, but not
    the pages of files it maps (libraries), whose accounting depends on which other processes
    on the machine map the same files."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return b""


def tree_memory_bytes(pid: int) -> int:
    """Anonymous resident memory of process ``pid`` and its descendants, summed (Linux
    ``/proc``): the memory buffers live in, leaving out shared libraries and mapped files.

    A child that has not exec'd yet (same command line as its parent) is skipped: ``spawn``
    starts workers with vfork + exec, and until the exec the child shares its parent's whole
    address space. (So this fits spawned workers, not forked ones, whose pages stay shared
    with the parent.) Compare against a baseline taken the same way.
    """
    total, todo = 0, [(pid, b"")]
    while todo:
        p, parent_cmd = todo.pop()
        cmd = _cmdline(p)
        if parent_cmd and cmd == parent_cmd:
            continue
        try:
            total += _anonymous_bytes(p)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        todo += [(c, cmd) for c in _children(p)]
    return total


class PeakTreeMemory:
    """Polls ``tree_memory_bytes(pid)`` on a thread every ``interval_s`` and keeps the peak.

    ``with PeakTreeMemory(proc.pid) as peak: proc.wait()`` then ``peak.bytes``. A peak shorter
    than the interval can be missed; prepare's buffers live for tens of milliseconds or more.
    """

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.pid, self.interval_s = pid, interval_s
        self.bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.bytes = max(self.bytes, tree_memory_bytes(self.pid))
            self.samples += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
