#!/usr/bin/env python
"""The demo's figures with their noise: mean, standard deviation, min and max over several `make demo` runs
(different --seed, same held-out prompts), so a recipe change is judged against the spread it has to beat.

  make demo-seeds SEEDS="0 1 2"    # runs `make demo` once per seed into outputs/demo_seed<S>, then this script
  python -m bench.demo_spread outputs/demo_seed0 outputs/demo_seed1 outputs/demo_seed2 \\
      --out bench/results/demo_seeds_cpu.json

Reads each run's eval/scores.json (caption accuracy taken apart: per candidate, oracle, top-1 per ranking, rerank
efficiency, per attribute, one vs two objects), dvae_quality.json, the job's seconds (.start/.seconds), each stage's (stages.json, bench/stage.py) and the machine's
fp32 matmul GFLOP/s they were measured at (machine.json, bench/machine.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import emit


def flatten(data, prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"a.b.c": value}."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def run_figures(run: Path) -> dict[str, float]:
    scores = json.loads((run / "eval" / "scores.json").read_text())["summary"]
    figures = flatten(scores.get("caption", {}), "caption.")
    dvae = json.loads((run / "dvae_quality.json").read_text())
    figures.update({f"dvae.{k}": float(dvae[k]) for k in ("psnr_db", "codebook_usage", "recon_caption_accuracy")})
    if (run / ".seconds").is_file():
        figures["job_seconds"] = float((run / ".seconds").read_text())
    if (run / "machine.json").is_file():  # bench/machine.py: the fp32 matmul rate the seconds were measured at
        figures["fp32_matmul_gflops"] = float(json.loads((run / "machine.json").read_text())["fp32_matmul_gflops"])
    if (run / "stages.json").is_file():  # bench/stage.py: seconds per stage
        figures.update({f"stage_seconds.{s['name']}": float(s["seconds"]) for s in json.loads((run / "stages.json").read_text())})
    return figures


def spread(rows: list[dict]) -> dict:
    """Mean, sample standard deviation (0 for one run), min and max of every figure that is a number in every row."""
    names = sorted(k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows))
    out = {}
    for name in names:
        values = np.array([r[name] for r in rows], dtype=float)
        out[name] = {"mean": round(float(values.mean()), 4), "std": round(float(values.std(ddof=1)), 4)
                     if len(values) > 1 else 0.0, "min": float(values.min()), "max": float(values.max())}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="demo output directories (one per seed)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    per_run = {run: run_figures(Path(run)) for run in args.runs}
    device = json.loads((Path(args.runs[0]) / "eval" / "scores.json").read_text())["summary"].get("device")
    return emit({"bench": "demo_spread", "device": device, "runs": len(args.runs), "spread": spread(list(per_run.values())),
                 "per_run": per_run}, args.out)


if __name__ == "__main__":
    main()
