"""Running many runs: at most J processes at a time, in dependency order, with progress.

``run_all(specs, jobs, launcher)`` reuses finished runs, resumes interrupted ones, starts the
rest as their ``needs`` finish, and reports each run's outcome. ``Progress`` prints one line per
event and a status line (redrawn in place on a terminal). On Ctrl-C or SIGTERM every live run
gets one SIGINT, writes a checkpoint and stops; the same call later resumes them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from mixlab.orchestrate.launch import (
    Launcher,
    Process,
    available_cores,
    log_path,
    parallelism,
    requested_threads,
    subprocess_launcher,
)
from mixlab.orchestrate.spec import RunSpec, run_state
from mixlab.report.runs import METRICS, SUMMARY


class StepTail:
    """The latest ``step`` written to a run's metrics.jsonl, read incrementally."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.step = 0
        self._partial = ""

    def poll(self) -> int:
        try:
            with self.path.open(encoding="utf-8") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
                self.offset = fh.tell()
        except FileNotFoundError:
            return self.step
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()  # a line still being written
        for raw in lines:
            try:
                step = json.loads(raw).get("step")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(step, int):
                self.step = max(self.step, step)
        return self.step


class Progress:
    """Status of a comparison on a stream: one line per event, and a status line that is
    redrawn in place on a terminal, or printed every ``every_s`` seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 15.0, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = every_s
        self.enabled = enabled
        self._last = 0.0
        self._drawn = False
        self.start = time.monotonic()

    def event(self, text: str) -> None:
        if not self.enabled:
            return
        self._clear()
        print(f"[compare] {text}", file=self.stream, flush=True)

    def status(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()
            self._drawn = True
        elif force or now - self._last >= self.every_s:
            print(text, file=self.stream, flush=True)
            self._last = now

    def close(self) -> None:
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False


def _fmt_time(seconds: float) -> str:
    secs = round(seconds)
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


# ---------------------------------------------------------------------------------------------
# Scheduling


Outcome = Literal["reused", "finished", "failed", "skipped"]


@dataclass
class _Running:
    spec: RunSpec
    proc: Process
    tail: StepTail
    started: float


def run_all(
    specs: list[RunSpec],
    jobs: int | None = None,
    launcher: Launcher = subprocess_launcher,
    progress: Progress | None = None,
    poll_s: float = 1.0,
    force: bool = False,
    cores: int | None = None,
) -> dict[str, Outcome]:
    """Run every spec not already done, at most J at a time, respecting ``needs``.

    Returns each run's outcome. A failed run does not stop the others; runs that need it are
    skipped. On Ctrl-C (or SIGTERM) each live run gets one SIGINT, so it stops at the next step
    with a checkpoint, and the same command resumes it later.
    """
    progress = progress or Progress(enabled=False)
    states = {s.key: run_state(s, force) for s in specs}
    outcome: dict[str, Outcome] = {k: "reused" for k, st in states.items() if st == "done"}
    todo = [s for s in specs if states[s.key] != "done"]
    if outcome:
        progress.event(f"reusing {len(outcome)} finished run(s): {', '.join(outcome)}")
    # A train.threads the user set wins over compare's choice (every run shares the [train]
    # table, so one value; the largest is taken should they ever differ).
    user_threads = max((requested_threads(s) for s in todo), default=0)
    j, threads = parallelism(jobs, len(todo), cores, threads=user_threads)
    if todo:
        how = " (train.threads of the config)" if user_threads else ""
        progress.event(
            f"{len(todo)} run(s) to train, {j} at a time with {threads} thread(s) each{how}"
        )
        n_cores = cores or available_cores()
        if j > 1 and j * threads > n_cores:
            progress.event(
                f"note: {j} x {threads} threads exceed the {n_cores} cores; runs will slow each "
                "other down (lower --jobs or train.threads)"
            )
    total_steps = sum(s.steps for s in todo)
    done_steps = 0
    pending = list(todo)
    running: dict[str, _Running] = {}

    with _sigterm_as_interrupt():
        try:
            while pending or running:
                for spec in list(pending):
                    bad = [n for n in spec.needs if outcome.get(n) in ("failed", "skipped")]
                    if bad:
                        pending.remove(spec)
                        outcome[spec.key] = "skipped"
                        progress.event(f"skipped {spec.key}: {', '.join(bad)} did not finish")
                for spec in list(pending):
                    if len(running) >= j:
                        break
                    if any(outcome.get(n) not in ("reused", "finished") for n in spec.needs):
                        continue
                    pending.remove(spec)
                    resume = states[spec.key] == "resume"
                    proc = launcher(spec, resume, requested_threads(spec) or threads)
                    running[spec.key] = _Running(
                        spec, proc, StepTail(spec.run_dir / METRICS), time.monotonic()
                    )
                    progress.event(f"{'resumed' if resume else 'started'} {spec.key}")
                for key, r in list(running.items()):
                    rc = r.proc.poll()
                    if rc is None:
                        continue
                    del running[key]
                    done_steps += r.spec.steps
                    took = _fmt_time(time.monotonic() - r.started)
                    if rc == 0 and (r.spec.run_dir / SUMMARY).is_file():
                        outcome[key] = "finished"
                        progress.event(f"finished {key} in {took}{_result_text(r.spec)}")
                    else:
                        outcome[key] = "failed"
                        progress.event(
                            f"FAILED {key} (exit {rc}) after {took}; see {log_path(r.spec)}"
                            + _log_tail(log_path(r.spec))
                        )
                live = sum(r.tail.poll() for r in running.values())
                progress.status(
                    _status_line(specs, outcome, running, done_steps + live, total_steps, progress)
                )
                if pending or running:
                    time.sleep(poll_s)
        except KeyboardInterrupt:
            progress.close()
            _stop(running, progress)
            raise
    progress.close()
    return outcome


def _status_line(
    specs: list[RunSpec],
    outcome: dict[str, Outcome],
    running: dict[str, _Running],
    steps: int,
    total_steps: int,
    progress: Progress,
) -> str:
    elapsed = time.monotonic() - progress.start
    bad = sum(1 for v in outcome.values() if v in ("failed", "skipped"))
    parts = [f"[compare] {len(outcome) - bad}/{len(specs)} runs done"
             + (f" ({bad} failed or skipped)" if bad else "")]  # fmt: skip
    if running:
        parts.append(
            "running: " + ", ".join(f"{k} {r.tail.step}/{r.spec.steps}" for k, r in running.items())
        )
    parts.append(f"elapsed {_fmt_time(elapsed)}")
    if 0 < steps < total_steps:
        parts.append(f"ETA ~{_fmt_time(elapsed * (total_steps - steps) / steps)}")
    return " · ".join(parts)


def _result_text(spec: RunSpec) -> str:
    try:
        summary = json.loads((spec.run_dir / SUMMARY).read_text(encoding="utf-8"))
        return f": avg test PPL {float(summary['test']['avg_ppl']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line}" for line in tail)


def _stop(running: dict[str, _Running], progress: Progress, grace_s: float = 60.0) -> None:
    """Ask every live run to stop (one SIGINT: it checkpoints), then kill stragglers."""
    if not running:
        return
    progress.event(f"interrupted: stopping {len(running)} run(s) (they write a checkpoint)")
    for r in running.values():
        with suppress(ProcessLookupError):
            r.proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for r in running.values():
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
    progress.event("stopped; run the same command again to resume")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C, so the runs (in their own sessions) are stopped, not orphaned."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

