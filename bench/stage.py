#!/usr/bin/env python
"""Run one stage of a job and record its wall seconds: where the demo's minutes go.

  python -m bench.stage --log outputs/demo/stages.json --name dvae -- python train/train_dvae.py ...
Appends {"name": ..., "seconds": ...} to the JSON list in --log (created when missing) and exits with the
command's status; bench/demo_spread.py reports each stage's seconds beside the figures. Stages may run at once
(`make demo` trains the CLIP beside the dVAE): the append holds an exclusive lock on <log>.lock, so none is lost.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="JSON file with the list of stages")
    p.add_argument("--name", required=True, help="this stage's name")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command: give it after --")
    start = time.perf_counter()
    status = subprocess.call(command)
    append(Path(args.log), {"name": args.name, "seconds": round(time.perf_counter() - start, 1), "status": status})
    return status


def append(log: Path, entry: dict) -> None:
    """Add `entry` to the JSON list in `log` under an exclusive lock (concurrent stages read-modify-write it)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_name(log.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stages = json.loads(log.read_text()) if log.is_file() else []
        stages.append(entry)
        log.write_text(json.dumps(stages, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
