"""Starting one run: the ``mixlab train`` command line, its environment, and the launchers.

A launcher is ``(spec, resume, threads) -> Process``: ``subprocess_launcher`` starts ``python -m
mixlab train`` in a session of its own (what the CLI uses), ``inline_launcher`` trains in this
process and returns an already finished process (tests, the Python API, benchmarks).
``parallelism`` chooses how many runs go at once and with how many torch threads each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from mixlab.orchestrate.spec import RunSpec

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000"}
"""glibc settings that keep freed memory in the process. With the defaults, every training step
unmaps and re-maps its large activation buffers (the logits alone are batch x seq x vocab x 4
bytes): measured on the built-in corpus (60 steps, one thread) 13.4 s of system time and 32 s
wall, against 0.7 s and 20 s with these. glibc reads them only at start-up (``mallopt`` refuses
an mmap threshold above 32 MB), hence the re-exec in ``mixlab.cli.entry``; every run a launcher
starts gets them too."""


class Process(Protocol):
    """The part of ``subprocess.Popen`` the scheduler uses (tests inject fakes)."""

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


Launcher = Callable[["RunSpec", bool, int], Process]
"""(spec, resume, threads) -> a started process."""


def train_command(spec: RunSpec, resume: bool, threads: int) -> list[str]:
    """The ``mixlab train`` command line of one run."""
    cmd = [
        sys.executable, "-m", "mixlab", "train", str(spec.config_path),
        "--out", str(spec.run_dir),
        "--set", f"train.threads={threads}",
        "--set", "train.progress=false",
    ]  # fmt: skip
    if resume:
        cmd.append("--resume")
    return cmd


def log_path(spec: RunSpec) -> Path:
    """``DIR/logs/<mixer>-seed<k>.log`` of a run at ``DIR/runs/<mixer>/seed<k>``."""
    return spec.run_dir.parents[2] / "logs" / f"{spec.mixer}-seed{spec.seed}.log"


def subprocess_launcher(spec: RunSpec, resume: bool, threads: int) -> Process:
    """Start ``mixlab train`` for one run, its output appended to DIR/logs/<run>.log."""
    log = log_path(spec)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **MALLOC_ENV,
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = train_command(spec, resume, threads)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        # A session of its own: Ctrl-C reaches only compare, which forwards one SIGINT to each
        # run, so a run is never hit twice while it writes its interrupt checkpoint.
        return subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip


class Finished:
    """A process that has already exited with ``rc`` (what ``inline_launcher`` returns)."""

    def __init__(self, rc: int):
        self.rc = rc

    def poll(self) -> int:
        return self.rc

    def wait(self, timeout: float | None = None) -> int:
        return self.rc

    def send_signal(self, sig: int) -> None:
        pass

    def kill(self) -> None:
        pass


def inline_launcher(spec: RunSpec, resume: bool, threads: int) -> Finished:
    """Train one run in this process (blocking) instead of a subprocess: no start-up cost, one
    run at a time. For tests and the Python API; the CLI starts subprocesses."""
    from mixlab.train.config import load_config
    from mixlab.train.loop import train

    train(load_config(spec.config_path), spec.run_dir, resume=resume)
    return Finished(0)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def parallelism(
    jobs: int | None, n_runs: int, cores: int | None = None, threads: int = 0
) -> tuple[int, int]:
    """(J, T): processes at once and torch threads each.

    ``threads`` is the runs' ``train.threads``: 0 (its default, "torch's default") lets compare
    choose T = max(1, cores // J) with J = min(jobs, cores, runs to do); a value the user set
    (config or --set) is kept as T, and then J defaults to max(1, cores // T), so that J x T
    does not exceed the cores unless ``jobs`` asks for more.
    """
    cores = cores or available_cores()
    todo = max(1, n_runs)
    if threads > 0:
        return max(1, min(jobs or max(1, cores // threads), cores, todo)), threads
    j = max(1, min(jobs or cores, cores, todo))
    return j, max(1, cores // j)


def requested_threads(spec: RunSpec) -> int:
    """The run's ``train.threads`` as its config sets it; 0 = not set (compare chooses)."""
    return int((spec.config.get("train") or {}).get("threads") or 0)

