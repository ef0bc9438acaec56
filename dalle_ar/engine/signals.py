"""Stopping a run: SIGTERM/SIGINT end it cleanly (finish the step, save, exit 0 with `Stopped`), and
`fault_point` lets the crash tests SIGKILL the process at a named point, as a preemption would."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "DALLE_AR_FAULT"


def fault_point(name: str) -> None:
    """Crash-test hook: with DALLE_AR_FAULT=<name> (e.g. `save:4`, `step:7`) this process SIGKILLs itself
    at that point, the way a preempted node or the OOM killer would (tests/test_crash.py)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop finishes its step, saves and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the default behaviour stays
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(SystemExit):
    """Raised by `Trainer.fit` after a SIGTERM/SIGINT: the checkpoint is saved; exit status 0."""
