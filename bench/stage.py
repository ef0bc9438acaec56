#!/usr/bin/env python
"""Run one stage of a job and record its wall seconds: where the demo's minutes go.

  python -m bench.stage --log outputs/demo/stages.json --name dvae -- python train/train_dvae.py ...
Appends {"name": ..., "seconds": ...} to the JSON list in --log (created when missing) and exits with the
command's status; bench/demo_spread.py reports each stage's seconds beside the figures.
"""

from __future__ import annotations

import argparse
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
    log = Path(args.log)
    stages = json.loads(log.read_text()) if log.is_file() else []
    stages.append({"name": args.name, "seconds": round(time.perf_counter() - start, 1), "status": status})
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(stages, indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
