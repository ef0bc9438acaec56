"""Shared by the benchmarks: how a result is printed and recorded."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, out: str | None, echo: bool = True) -> dict:
    """Print one JSON line (unless echo=False: a partial result written as a run goes); also write it
    (pretty) to `out`, e.g. bench/results/NAME.json."""
    if echo:
        print(json.dumps(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
