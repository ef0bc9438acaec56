#!/usr/bin/env python
"""Make webdataset shards: the built-in synthetic shapes world, or an image folder with .txt captions.

  python train/make_shards.py synthetic --out data/shapes --num 8000
  python train/make_shards.py folder --src my_images/ --out data/mine [--caption_fallback cp1252]

Shards are written into <out>.partial/ and moved into <out> when all are done, so an interrupted run never leaves
a smaller dataset that looks complete (the next run removes the .partial directory and starts over). <out>/stats.json
says what was written and what was skipped, by reason (folder: no caption file, empty caption, caption not UTF-8).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
from pathlib import Path

from tqdm import tqdm

from dalle_ar.cli import run_cli
from dalle_ar.data import synthetic, write


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)
    s = sub.add_parser("synthetic", help="render the shapes world (deterministic by --seed)")
    s.add_argument("--out", required=True, help="output directory for NNNNNN.tar shards")
    s.add_argument("--num", type=int, default=8000, help="number of image/caption pairs (default: 8000)")
    s.add_argument("--image_size", type=int, default=64, help="image side in pixels (default: 64; paper: 256)")
    s.add_argument("--seed", type=int, default=0, help="world seed; use another seed for a held-out set (default: 0)")
    s.add_argument("--max_shapes", type=int, default=2, choices=(1, 2), help="shapes per image at most (default: 2)")
    s.add_argument("--p_two", type=float, default=0.5, help="probability of a two-shape scene (default: 0.5)")
    s.add_argument("--samples_per_shard", type=int, default=1000, help="(default: 1000)")
    s.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes rendering and PNG-encoding the images; the shards are the same for any count "
                        "(default: min(CPU count, 8))")
    f = sub.add_parser("folder", help="pack NAME.jpg|png + NAME.txt files from a folder (recursively)")
    f.add_argument("--src", required=True, help="folder with images and sidecar .txt captions")
    f.add_argument("--out", required=True, help="output directory for NNNNNN.tar shards")
    f.add_argument("--samples_per_shard", type=int, default=1000, help="(default: 1000)")
    f.add_argument("--caption_fallback", default=None, metavar="ENCODING",
                   help="decode captions that are not UTF-8 with this encoding (e.g. cp1252, latin-1) and count them "
                        "as converted; default: skip and count them")
    args = p.parse_args(argv)

    if args.source == "synthetic":
        if args.workers < 1:
            p.error(f"--workers {args.workers}: use 1 or more")
        render = functools.partial(_render, seed=args.seed, image_size=args.image_size, max_shapes=args.max_shapes,
                                   p_two=args.p_two)
        # spawned, not forked: a fork copies this process's threads' locks (torch, tqdm) into the workers
        pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
        with pool or contextlib.nullcontext():
            # in order: the same shards for any count
            examples = pool.imap(render, range(args.num), chunksize=64) if pool else map(render, range(args.num))
            n = write.write_image_shards(tqdm(examples, total=args.num, desc="render", mininterval=1.0), args.out,
                                         args.samples_per_shard)
        stats = {"written": n, "source": "synthetic", "seed": args.seed, "image_size": args.image_size,
                 "max_shapes": args.max_shapes, "p_two": args.p_two}
    else:
        stats = {**write.import_folder(args.src, args.out, args.samples_per_shard, args.caption_fallback),
                 "source": str(args.src)}
    (Path(args.out) / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))
    return stats


def _render(i: int, **world) -> tuple[str, bytes, str]:
    """Example i of the shapes world: its key, its PNG bytes and its caption."""
    image, text = synthetic.make_example(i, **world)
    return f"{i:09d}", write.encode_image(image, "png"), text


if __name__ == "__main__":
    run_cli(main)
