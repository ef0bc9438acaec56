"""Stopping a run: SIGTERM/SIGINT end it cleanly at any point, and `fault_point` lets the crash tests SIGKILL the
process at a named point, as a preemption would.

A signal that arrives while the loop waits for data or computes a step that has not reached its optimizer update
(`StopSignal.interruptible()`) interrupts at once: nothing of that step is kept, the state at the last step boundary
is checkpointed (unless it already is) and the run exits. One that arrives during an optimizer update or a save lets
it complete first. Exit status: 0 when the run can resume from where it stopped (the same command continues it),
128 + the signal number (143 for SIGTERM) when it stopped before its first step (nothing to save).

Outside a Trainer's `fit` the script-wide handler (`script_handlers`, installed by `cli.run_cli`) decides: a SIGTERM
before any run completed exits with 143 (`finally` blocks run, so the run lock is released); one after a run
completed (its export written: a scheduler's stop that lands as the job ends) exits 0, since nothing is left to lose.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager

FAULT_ENV = "DALLE_AR_FAULT"


def fault_point(name: str) -> None:
    """Crash-test hook: with DALLE_AR_FAULT=<name> (e.g. `save:4`, `step:7`) this process SIGKILLs itself
    at that point, the way a preempted node or the OOM killer would; with DALLE_AR_FAULT=<errno name>@<name>
    (`ENOSPC@save:4`, `EIO@save:4`) it raises that OSError there, as a full or failing disk would
    (tests/test_crash.py)."""
    fault = os.environ.get(FAULT_ENV, "")
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"SIGTERM@{name}":  # a stop signal that lands exactly there
        os.kill(os.getpid(), signal.SIGTERM)
    elif fault.endswith(f"@{name}"):
        code = getattr(errno, fault.split("@")[0])
        raise OSError(code, os.strerror(code))


_completed = False  # set by `mark_completed` once a run's export is written


def mark_completed() -> None:
    """A run in this process has completed: from now on the script-wide handler exits 0 on SIGTERM."""
    global _completed
    _completed = True


def _script_stop(signum, frame):
    if _completed:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    raise SystemExit(128 + signum)


def _on_sigterm(handler) -> None:
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the default behaviour stays
        pass


def script_handlers() -> None:
    """The SIGTERM handler of a whole script (`cli.run_cli`); a Trainer's own `StopSignal` replaces it while it
    trains and puts it back when `fit` ends."""
    _on_sigterm(_script_stop)


def done_handlers() -> None:
    """A script whose work is done ignores SIGTERM: Python puts the default action back for its own handlers while
    the interpreter shuts down (about a second with torch loaded), and a signal then would kill a finished run."""
    _on_sigterm(signal.SIG_IGN)


class Interrupted(BaseException):
    """Raised by the signal handler inside `StopSignal.interruptible()`: the step in progress is abandoned. A
    BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (data readers count and skip
    what fails) mistakes it for bad data."""


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag that the loop checks after each step; inside
    `interruptible()` (single-process runs: with several ranks, every rank must reach the same collective, so they
    stop together at the step's end) they raise `Interrupted` at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, interrupt: bool = True):
        self.received: str | None = None
        self.signum = 0
        self.interrupt = interrupt
        self._interruptible = False
        self._previous = {}

    def install(self) -> "StopSignal":
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the default behaviour stays
            self._previous = {}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received, self.signum = signal.Signals(signum).name, signum
        if self._interruptible:
            raise Interrupted(self.received)

    @contextmanager
    def interruptible(self):
        """A stretch the run may abandon: waiting for data, a step's forward and backward (not its update)."""
        if not self.interrupt:
            yield
            return
        self._interruptible = True
        try:
            if self.received is not None:
                raise Interrupted(self.received)
            yield
        finally:
            self._interruptible = False

    def __exit__(self, *exc):
        self.restore()


class Stopped(SystemExit):
    """Raised by `Trainer.fit` after a SIGTERM/SIGINT: exit 0 when the run can resume, 128 + signal before step 1."""
