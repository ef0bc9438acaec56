#!/usr/bin/env python
"""Muon's Newton-Schulz iteration in fp32 (what Muon runs on every CPU): seconds per training
step for the standard iteration and for the Gram one (`dalle_ar.engine.optim`), over a preset's hidden matrices,
and how far apart their results are. The transformer splits these matrices between its ranks; this times them all
on torch's thread count.

  OMP_NUM_THREADS=1 python -m bench.newton_schulz --preset tiny --out bench/results/newton_schulz_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import emit
from bench.machine import matmul_gflops
from dalle_ar.config import DalleConfig, preset
from dalle_ar.engine.optim import gram_newton_schulz, newton_schulz
from dalle_ar.model.transformer import DalleTransformer
from dalle_ar.report import device_name


def seconds_per_step(fn, grads: list[torch.Tensor], seconds: float) -> float:
    """Median over repeats of one pass over `grads` (median: a busy moment of a shared machine does not count)."""
    for g in grads:
        fn(g, 5)  # warm-up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        for g in grads:
            fn(g, 5)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seconds", type=float, default=5.0, help="time each method for about this long")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = DalleTransformer(preset(DalleConfig, args.preset))
    grads = [torch.randn_like(w) for w in model.muon_params()]
    standard = seconds_per_step(newton_schulz, grads, args.seconds)
    gram = seconds_per_step(gram_newton_schulz, grads, args.seconds)
    exact = [newton_schulz(g, 5) for g in grads]
    apart = max(((gram_newton_schulz(g, 5) - e).norm() / e.norm()).item() for g, e in zip(grads, exact))
    shapes = sorted({tuple(g.shape) for g in grads})
    return emit({"bench": "newton_schulz", "device": device_name("cpu"), "threads": torch.get_num_threads(),
                 "fp32_matmul_gflops": round(matmul_gflops(), 1), "preset": args.preset, "matrices": len(grads),
                 "shapes": [list(s) for s in shapes], "dtype": "float32", "iterations": 5,
                 "seconds_per_step": {"standard": round(standard, 4), "gram": round(gram, 4)},
                 "gram_speedup": round(standard / gram, 2), "max_relative_difference": float(f"{apart:.2e}")},
                args.out)


if __name__ == "__main__":
    main()
