#!/usr/bin/env python
"""Which dVAE objective works on your data? Train short runs of several recipes through the real trainer
(train/train_dvae.py, DeepSpeed engine) and score each on a held-out split (bench/dvae_quality.py's measure).

  python -m bench.dvae_recipes --data data/shapes --steps 300 --out bench/results/dvae_recipes_tiny_cpu.json
Recipes differ only in the loss flags below; everything else is the `tiny` preset at --lr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import dvae_quality, emit, synthetic_batches
from dalle_ar import models
from dalle_ar.data import synthetic
from dalle_ar.report import device_name

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "logit_laplace_paper": ["--reconstruction", "logit_laplace", "--kl_weight", "6.6", "--entropy_weight", "0"],
    "logit_laplace_entropy": ["--reconstruction", "logit_laplace", "--kl_weight", "6.6", "--entropy_weight", "0.01"],
    "logit_laplace_min_scale": ["--reconstruction", "logit_laplace", "--kl_weight", "6.6", "--entropy_weight", "0.01",
                                "--min_scale", "0.1"],
    "l1_entropy": ["--reconstruction", "l1", "--kl_weight", "0", "--entropy_weight", "0.01"],
    "mse_entropy (tiny preset)": ["--reconstruction", "mse", "--kl_weight", "0", "--entropy_weight", "0.01"],
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training image shards")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    p.add_argument("--heldout", type=int, default=512, help="held-out synthetic images (world seed synthetic.HELDOUT_SEED)")
    p.add_argument("--work", default="runs/dvae_recipes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    results = {}
    for name in args.recipes.split(","):
        out = Path(args.work) / name.split(" ")[0]
        shutil.rmtree(out, ignore_errors=True)
        # the real trainer, as its own process (a script is run, never imported)
        subprocess.run([sys.executable, str(ROOT / "train" / "train_dvae.py"), "--data", args.data, "--out", str(out),
                        "--steps", str(args.steps), "--batch_size", "32", "--lr", str(args.lr), "--warmup_steps", "50",
                        "--ema_decay", "0.99", "--save_every", "0", "--wandb", "disabled", "--no-progress",
                        *RECIPES[name]], env=env, check=True)
        export = out / "export"
        model, _ = models.load(export, kind="dvae")
        with torch.no_grad():
            results[name] = {"flags": " ".join(RECIPES[name]),
                             **dvae_quality(model, synthetic_batches(args.heldout, synthetic.HELDOUT_SEED, model.config.image_size, 128), "cpu")}
        print(name, results[name], flush=True)
    return emit({"bench": "dvae_recipes", "device": device_name("cpu"), "steps": args.steps, "lr": args.lr,
                 "data": args.data, "recipes": results}, args.out)


if __name__ == "__main__":
    main()
