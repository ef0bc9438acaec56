"""One live run per output directory: rank 0 holds an exclusive lock on `<out>/run.lock`, so a second launch on
the same `--out` (or a launch whose ranks were not discovered, each thinking it is rank 0 of 1) stops with a
one-line error naming the holder instead of writing checkpoints over a live run.

The lock is `flock(2)` on an open file: the kernel drops it when the holding process dies, however it dies, so a
lock left by a killed run is free and the next run takes it over (and says whose it was). The file keeps the
holder's pid, host and start time for that message. On network file systems flock works where the mount
supports it (NFSv4, Lustre with `-o flock`); elsewhere use a local `--out` per run.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dalle_ar.config import ConfigError

LOCK_FILE = "run.lock"
_held: dict[str, int] = {}  # this process's locks: a process may start several runs on one directory in turn


def _describe(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {info.get('started', '?')}"


def acquire(out: str | Path) -> None:
    """Take `<out>/run.lock` for this process, or raise ConfigError naming the live run that holds it."""
    path = Path(out) / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise ConfigError(f"{path.parent}: another run is writing here ({_describe(holder)}); wait for it to end, stop "
                          f"it, or pass another --out") from None
    previous = _read(fd)
    if previous:
        print(f"{path}: taking over the lock of a run that is no longer alive ({_describe(previous)})", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    _held[key] = fd


def release(out: str | Path) -> None:
    """The run in `out` is over (finished, stopped or failed): empty the lock file and let go of it. Only a run that
    died without getting here leaves its name behind, for the takeover note."""
    fd = _held.pop(str((Path(out) / LOCK_FILE).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        release(Path(key).parent)


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
