#!/usr/bin/env python
"""Caption accuracy against the transformer's training minutes, one line per recipe and seed: how far the demo's
recipe is from its goals and what more training (or data) buys. Each --run is one eval of the demo's command
(sample/generate.py --synthetic_prompts 64 ..., its scores.json) with its recipe's name, the seed, the transformer's
steps and its training seconds:

  python -m bench.quality_curve --run "8,000 images" 1 1600 646 outputs/demo_seed1/eval \\
      --run "8,000 images" 1 3200 1257 outputs/t3200_s1/eval --out bench/results/quality_curve_cpu.json \\
      --plot docs/quality_curve.png

Prints one JSON object: a point per run (per candidate, two-object per candidate, oracle, CLIP and likelihood top-1,
rerank efficiency) and, per recipe and step count, their mean, sd, minimum and maximum over seeds; --plot draws per-candidate
accuracy and CLIP top-1 against minutes (a colour per seed, a line style per recipe) with the 90% top-1 goal.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from bench.common import emit
from bench.demo_spread import spread

TOP1_GOAL = 0.9
FIGURES = ("minutes", "per_candidate", "two_object_per_candidate", "oracle", "clip_top1", "likelihood_top1",
           "rerank_efficiency")  # the figures of a point that by_steps spreads over seeds


def point(recipe: str, seed: int, steps: int, seconds: float, eval_dir: str) -> dict:
    caption = json.loads((Path(eval_dir) / "scores.json").read_text())["summary"]["caption"]
    two = caption.get("by_objects", {}).get("2", {})
    return {"recipe": recipe, "seed": seed, "steps": steps, "minutes": round(seconds / 60, 2), "eval": eval_dir,
            "per_candidate": round(caption["per_candidate"], 4),
            "two_object_per_candidate": round(two["per_candidate"], 4) if two else None,
            "oracle": round(caption["oracle"], 4), "clip_top1": round(caption["top1"]["clip"], 4),
            "likelihood_top1": round(caption["top1"]["likelihood"], 4),
            "rerank_efficiency": round(caption["rerank_efficiency"]["clip"], 4)}


def by_steps(points: list[dict]) -> dict:
    """Per recipe and step count, the spread over seeds of each figure (`demo_spread.spread`: mean, sd, min, max; the
    minimum is what 'every seed' asks). Recipes are never pooled."""
    out = {}
    for recipe, steps in dict.fromkeys((p["recipe"], p["steps"]) for p in points):
        rows = [p for p in points if (p["recipe"], p["steps"]) == (recipe, steps)]
        figures = [{k: v for k, v in p.items() if k in FIGURES} for p in rows]
        out[f"{recipe}, {steps} steps"] = {"seeds": sorted(p["seed"] for p in rows)} | spread(figures)
    return out


def plot(points: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110, sharey=True)
    for ax, key, title in zip(axes, ("per_candidate", "clip_top1"),
                               ("candidates passing the check (all of them)", "CLIP top-1 (one pick per prompt)")):
        recipes, seeds = list(dict.fromkeys(p["recipe"] for p in points)), sorted({p["seed"] for p in points})
        for recipe, seed in itertools.product(recipes, seeds):
            rows = sorted((p for p in points if (p["recipe"], p["seed"]) == (recipe, seed)), key=lambda p: p["minutes"])
            if not rows:
                continue
            r = recipes.index(recipe) % 4
            style = "osD^"[r] + ("-", "--", ":", "-.")[r]  # a marker and a line style per recipe
            ax.plot([p["minutes"] for p in rows], [100 * p[key] for p in rows], style,
                    color=f"C{seeds.index(seed)}", label=f"{recipe}, seed {seed}")
            for p in rows:
                ax.annotate(f"{p['steps']:,}", (p["minutes"], 100 * p[key]), textcoords="offset points",
                            xytext=(3, -10), fontsize=7)
        if key == "clip_top1":
            ax.axhline(100 * TOP1_GOAL, color="k", ls="--", lw=1, label="goal")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("transformer training minutes (labels: steps)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% right (held-out prompts)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs=5, action="append", required=True,
                   metavar=("RECIPE", "SEED", "STEPS", "SECONDS", "EVAL_DIR"),
                   help="one eval: its recipe's name (e.g. the images it trained on), the seed, the transformer's steps "
                        "and training seconds, the eval's output directory")
    p.add_argument("--note", default="", help="recorded with the result (the machine, how the seconds were measured)")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="also draw the curve to this PNG")
    args = p.parse_args(argv)
    points = [point(r, int(s), int(n), float(sec), d) for r, s, n, sec, d in args.run]
    if args.plot:
        plot(points, args.plot)
    return emit({"bench": "quality_curve", "note": args.note, "top1_goal": TOP1_GOAL, "points": points,
                 "by_steps": by_steps(points)}, args.out)


if __name__ == "__main__":
    main()
