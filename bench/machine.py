#!/usr/bin/env python
"""How fast is this machine? fp32 matmul GFLOP/s (2048 x 2048, torch's thread count), recorded beside every time
the demo reports, since the same job takes 700 s on one 2-core machine and 1,250 s on another.

  python -m bench.machine --out outputs/demo/machine.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import emit
from dalle_ar.report import device_name


def matmul_gflops(n: int = 2048, seconds: float = 1.0) -> float:
    """Best of repeated fp32 n x n matmuls over about `seconds` (best, so a busy moment does not count)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, allocator
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return emit({"bench": "machine", "device": device_name("cpu"), "threads": torch.get_num_threads(),
                 "fp32_matmul_gflops": round(matmul_gflops(), 1)}, args.out)


if __name__ == "__main__":
    main()
