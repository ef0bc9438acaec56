#!/usr/bin/env python
"""Which sampling temperature gives the most correct kept images? Sample the same trained demo runs again at
several temperatures (sample/generate.py, exactly the demo's eval command otherwise) on shapes-world prompt sets,
and report every run's caption figures with their mean and spread over the runs: candidates passing the check,
oracle, CLIP / likelihood / first-drawn top-1, rerank efficiency, one vs two objects.

  python -m bench.sampling_sweep outputs/demo_seed0 outputs/demo_seed1 outputs/demo_seed2 \\
      --temperatures 0.25,0.4,0.55,0.7 --sets dev,heldout --work outputs/sampling_sweep \\
      --out bench/results/demo_temperature_cpu.json

A run is a `make demo` output directory (runs/dalle/export, runs/clip/export); it is sampled with the seed its
own eval used (eval/scores.json), or --seed. Prompt sets: `heldout` is the demo's 64 held-out prompts (world seed
synthetic.HELDOUT_SEED), `dev` the same number drawn from a third world seed (--dev_seed; training uses 0): choose
on dev, then report held-out. Sampling costs no training, so the choice changes no stage's time. Rerunning skips
samples already written under --work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import emit
from bench.demo_spread import spread
from bench.transformer_recipes import script, summarize
from dalle_ar.data import synthetic
from dalle_ar.report import device_name

DEV_SEED = 777  # the development prompts' world seed (training uses 0, held-out prompts synthetic.HELDOUT_SEED)
# the figures the table shows (summarize()'s keys), in its column order
TABLE = ("per_candidate", "oracle", "top1.clip", "rerank_efficiency.clip", "top1.likelihood", "top1.sampling",
         "by_objects.1.per_candidate", "by_objects.2.per_candidate")


def run_seed(run: Path, default: int | None) -> int:
    if default is not None:
        return default
    scores = run / "eval" / "scores.json"
    if not scores.exists():
        raise SystemExit(f"{run}: no eval/scores.json to take the sampling seed from; pass --seed")
    return int(json.loads(scores.read_text())["settings"]["seed"])


def sample(run: Path, world_seed: int, temperature: float, seed: int, out: Path, args) -> dict:
    """One sampling of `run` (the demo's eval command at `temperature`), or the one already in `out`."""
    scores = out / "scores.json"
    if not scores.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        script(f"{run} t={temperature}", out.parent / f"{out.name}.log", {}, "sample/generate.py",
               "--dalle", str(run / "runs/dalle/export"), "--clip", str(run / "runs/clip/export"),
               "--synthetic_prompts", str(args.prompts), "--synthetic_seed", str(world_seed),
               "--num_candidates", str(args.candidates), "--top_k_rerank", str(min(4, args.candidates)),
               "--temperature", str(temperature), "--seed", str(seed), "--no-progress", "--out", str(out))
    caption = json.loads(scores.read_text())["summary"]["caption"]
    row = summarize(caption)
    # rerank efficiency is undefined (None) when no prompt has a correct candidate
    row.update({f"rerank_efficiency.{k}": None if v is None else round(v, 4) for k, v in caption["rerank_efficiency"].items()})
    shape = caption["pairwise"]["clip"].get("shape")  # a correct candidate above one wrong only in shape
    row["pairwise.clip.shape"] = round(shape["accuracy"], 4) if shape else None
    return row


def table(sets: dict) -> str:
    lines = ["| set | temperature | " + " | ".join(TABLE) + " |", "|" + " --- |" * (len(TABLE) + 2)]
    for name, temps in sets.items():
        for t, part in temps.items():
            cells = [f"{100 * part['spread'][k]['mean']:.1f} ± {100 * part['spread'][k]['std']:.1f}"
                     if k in part["spread"] else "-" for k in TABLE]
            lines.append(f"| {name} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="make demo output directories (runs/dalle/export, runs/clip/export)")
    p.add_argument("--temperatures", default="0.4,0.7")
    p.add_argument("--sets", default="dev,heldout", help="prompt sets: dev and/or heldout")
    p.add_argument("--dev_seed", type=int, default=DEV_SEED, help=f"world seed of the dev prompts (default {DEV_SEED})")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--seed", type=int, default=None, help="sampling seed for every run (default: each run's eval seed)")
    p.add_argument("--work", default="outputs/sampling_sweep")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    temperatures = [float(t) for t in args.temperatures.split(",")]
    if not all(t > 0 for t in temperatures):
        p.error(f"--temperatures {args.temperatures}: every temperature must be above 0")
    world = {"dev": args.dev_seed, "heldout": synthetic.HELDOUT_SEED}
    names = args.sets.split(",")
    if unknown := [s for s in names if s not in world]:
        p.error(f"--sets {args.sets}: unknown {unknown}; choose from {sorted(world)}")
    if args.dev_seed in (0, synthetic.HELDOUT_SEED):
        p.error(f"--dev_seed {args.dev_seed}: that world seed is the training or held-out one")
    for run in args.runs:
        for sub in ("runs/dalle/export", "runs/clip/export"):
            if not (run / sub).is_dir():
                p.error(f"{run}: no {sub} (pass `make demo` output directories)")
    # a run's samples go to --work/<set>/<its directory's name>: two runs of one name would read each other's
    seen = {}
    for run in args.runs:
        if run.name in seen:
            p.error(f"{seen[run.name]} and {run}: both are named {run.name!r}, so their samples would share "
                    f"{Path(args.work) / '<set>' / run.name}; pass directories with distinct names (symlinks will do)")
        seen[run.name] = run
    seeds = {run: run_seed(run, args.seed) for run in args.runs}
    sets = {}
    for name in names:
        sets[name] = {}
        for t in temperatures:
            per_run = {str(run): sample(run, world[name], t, seeds[run], Path(args.work) / name / run.name / f"t{t}", args)
                       for run in args.runs}
            sets[name][f"t={t}"] = {"per_run": per_run, "spread": spread(list(per_run.values()))}
            print(name, f"t={t}", json.dumps(sets[name][f"t={t}"]["spread"].get("top1.clip")), flush=True)
    return emit({"bench": "sampling_sweep", "device": device_name("cpu"), "runs": [str(r) for r in args.runs],
                 "seeds": {str(r): s for r, s in seeds.items()}, "prompts": args.prompts, "candidates": args.candidates,
                 "world_seeds": {n: world[n] for n in names}, "sets": sets, "table": table(sets)}, args.out)


if __name__ == "__main__":
    main()
