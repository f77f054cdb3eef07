"""Stopping a run cleanly when the machine asks for it back.

Schedulers end a job with a signal: Slurm and Kubernetes send SIGTERM and SIGKILL after a grace
period, Slurm can send SIGUSR1 ahead of time (``--signal=USR1@120``), a closed terminal sends
SIGHUP, Ctrl-C SIGINT. ``StopRequests`` turns the first of these into a request that the loop
reads at the next step boundary: it writes a checkpoint there — the same checkpoint a periodic
one would be, so resuming is bit-identical — and exits with 128 + the signal's number. A second
signal stops at once without a new checkpoint (the last one on disk is intact: checkpoint writes
are atomic).

The handler only records the signal: a checkpoint written from inside a signal handler could
catch the loop half-way through a step (sampler advanced, model not), which is what made the
old Ctrl-C checkpoint resume into a different run.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGHUP")
"""The signals that request a checkpoint and a stop (those the platform has)."""


class StopRequests:
    """Context manager: while active, the signals of ``SIGNALS`` set ``signum`` instead of
    killing the process. Outside the main thread (where Python cannot install handlers) it does
    nothing and the signals keep their default action."""

    def __init__(self, what: str = "mixlab"):
        self.what = what
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(f"{self.what}: {name} received; writing a checkpoint at the end of this step "
                 "(send it again to stop at once)")
            return
        _say(f"{self.what}: {name} received again; stopping now, without a new checkpoint")
        os._exit(128 + signum)


def _say(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed (a hung-up terminal): the stop still happens
        pass
