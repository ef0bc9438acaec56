#!/usr/bin/env python
"""Which transformer recipe draws the most correct images for its steps? Train several recipes on the same token
shards through the real trainer (train/train_dalle.py, DeepSpeed engine), sample each on the held-out shapes-world
prompts (sample/generate.py, no CLIP: candidates in sampling order, and the transformer's own likelihood), and
report the generator's figures side by side: candidates passing the caption check, oracle, likelihood top-1, by
number of objects.

  python -m bench.transformer_recipes --tokens outputs/demo/data/tokens --tokenizer outputs/demo/runs/tokenizer \\
      --steps 800 --recipe "lr 1e-3=--lr 1e-3" --recipe "lr 2e-3=--lr 2e-3" --recipe "lr 3e-3=--lr 3e-3" \\
      --jobs 3 --out bench/results/transformer_lr_cpu.json

A recipe is NAME=FLAGS: train_dalle.py flags added after --common (default: the demo's batch, lr 2e-3, warmup and seed),
so a recipe's flags win. --jobs runs that many recipes at once, each on cpu_count / jobs threads: on a 2-core CPU three
one-thread runs train this small model faster in all than one after another on two threads. The seconds recorded are
then those of runs sharing the CPU, comparable with each other only. Rerunning skips recipes whose eval exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import emit
from bench.machine import matmul_gflops
from dalle_ar.cli import run_script
from dalle_ar.report import device_name

ROOT = Path(__file__).resolve().parents[1]
DEMO_FLAGS = "--batch_size 32 --lr 2e-3 --warmup_steps 50 --seed 0"  # make demo's transformer
# the figures kept from sample/generate.py's caption report (scores.json "summary.caption")
KEPT = ("per_candidate", "oracle")


def parse_recipe(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--recipe {text!r}: write NAME=FLAGS, e.g. \"lr 2e-3=--lr 2e-3\"")
    return name.strip(), shlex.split(flags)


def summarize(caption: dict) -> dict:
    """The generator's figures from a caption report: overall, then per number of objects."""
    row = {k: round(caption[k], 4) for k in KEPT}
    row.update({f"top1.{k}": round(v, 4) for k, v in caption["top1"].items()})
    for n, part in sorted(caption.get("by_objects", {}).items()):
        row[f"by_objects.{n}.per_candidate"] = round(part["per_candidate"], 4)
        row[f"by_objects.{n}.oracle"] = round(part["oracle"], 4)
    row.update({f"attributes.{k}": round(v, 4) for k, v in caption.get("attributes", {}).items()})
    return row


def last_loss(run: Path) -> float | None:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    return round(losses[-1], 4) if losses else None


def script(name: str, log: Path, env: dict, path: str, *argv: str) -> None:
    """Run a repo script with its output in `log`; a failure stops the bench with its last line and the log's path."""
    code = run_script(ROOT, path, list(argv), env=env, log=log)
    if code:
        lines = log.read_text().strip().splitlines() or ["(no output)"]
        raise SystemExit(f"recipe {name!r}: {path} failed (exit {code}): {lines[-1]}\nwhole output: {log}")


def run_recipe(name: str, flags: list[str], args, threads: int) -> dict:
    run = Path(args.work) / name.replace(" ", "_").replace("/", "_")
    scores = run / "eval" / "scores.json"
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    timing = run / "bench_seconds.json"
    if not scores.exists():
        run.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # the real trainer, as its own process
        script(name, run.parent / f"{run.name}.train.log", env, "train/train_dalle.py", "--data", args.tokens,
               "--tokenizer", args.tokenizer, "--out", str(run), "--steps", str(args.steps), "--save_every", "0",
               "--no-progress", *shlex.split(args.common), *flags)
        t1 = time.perf_counter()
        script(name, run.parent / f"{run.name}.eval.log", env, "sample/generate.py", "--dalle", str(run / "export"),
               "--synthetic_prompts", str(args.prompts), "--num_candidates", str(args.candidates), "--top_k_rerank", "1",
               "--temperature", str(args.temperature), "--seed", "0", "--out", str(run / "eval"))
        timing.write_text(json.dumps({"train_s": round(t1 - t0, 1), "eval_s": round(time.perf_counter() - t1, 1)}))
    seconds = json.loads(timing.read_text()) if timing.exists() else {}
    caption = json.loads(scores.read_text())["summary"]["caption"]
    row = {"flags": " ".join(flags), **seconds, "last_loss": last_loss(run), **summarize(caption)}
    print(name, json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, help="token shards (train/encode.py output, with its meta.json)")
    p.add_argument("--tokenizer", required=True, help="the BPE directory")
    p.add_argument("--recipe", type=parse_recipe, action="append", required=True, help="NAME=FLAGS (repeat)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--common", default=DEMO_FLAGS, help=f"flags every recipe gets first (default: {DEMO_FLAGS!r})")
    p.add_argument("--prompts", type=int, default=64, help="held-out shapes-world prompts")
    p.add_argument("--candidates", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--jobs", type=int, default=1, help="recipes trained at once")
    p.add_argument("--work", default="runs/transformer_recipes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = [n for n, _ in args.recipe]
    if len(set(names)) != len(names):
        p.error(f"--recipe: names must differ, got {names}")
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    gflops = round(matmul_gflops(), 1)  # before the runs, on a quiet machine: the yardstick for their seconds
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda r: run_recipe(*r, args, threads), args.recipe))
    return emit({"bench": "transformer_recipes", "device": device_name("cpu"), "fp32_matmul_gflops": gflops, "jobs": args.jobs,
                 "threads_per_job": threads, "steps": args.steps, "common": args.common, "tokens": args.tokens,
                 "prompts": args.prompts, "candidates": args.candidates, "temperature": args.temperature,
                 "recipes": dict(zip(names, rows))}, args.out)


if __name__ == "__main__":
    main()
