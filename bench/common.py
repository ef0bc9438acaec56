"""Shared by the benchmarks: the device description and how a result is printed and recorded."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def emit(result: dict, out: str | None) -> dict:
    """Print one JSON line; also write it (pretty) to `out`, e.g. bench/results/NAME.json."""
    print(json.dumps(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result
