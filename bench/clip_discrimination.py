#!/usr/bin/env python
"""Can this CLIP tell a right image from a wrong one? The test a reranking or evaluator CLIP must pass before its
scores mean anything on the shapes world (dalle_ar.evaluation.clip_discrimination).

  python -m bench.clip_discrimination --clip outputs/demo/runs/clip/export --scenes 256 \\
      --out bench/results/clip_discrimination_demo_cpu.json

For each held-out scene (world --seed, not a training seed) and each attribute that can change (colour, shape, size,
position or relation), the CLIP's cosine for the scene's caption is compared between a render of the scene and a
render of the scene with that one attribute changed; pairwise accuracy = how often the true render scores higher.
Prints one JSON object (overall and per attribute); several --clip are measured one after another.
"""

from __future__ import annotations

import argparse

from bench.common import emit
from dalle_ar.clip import ClipScorer
from dalle_ar.data import synthetic
from dalle_ar.evaluation import clip_discrimination
from dalle_ar.report import device_name


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, action="append", help="CLIP export directory or ARCH:/local/weights")
    p.add_argument("--scenes", type=int, default=256, help="held-out scenes (each gives 4 pairs)")
    p.add_argument("--seed", type=int, default=synthetic.HELDOUT_SEED,
                   help="world seed of the scenes (not a training seed)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    results = {spec: clip_discrimination(ClipScorer.load(spec, args.device), args.scenes, args.seed, args.image_size)
               for spec in args.clip}
    return emit({"bench": "clip_discrimination", "device": device_name(args.device), "clips": results}, args.out)


if __name__ == "__main__":
    main()
