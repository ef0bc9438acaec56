#!/usr/bin/env python
"""Encode image shards to token shards with a trained dVAE (codes for the transformer).

  python train/encode.py --dvae runs/dvae/export --data data/shapes --out data/shapes_tokens
Each output sample holds KEY.codes.npy (grid of uint16 codes) and KEY.txt (the caption).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from dalle_ar.checkpoint import load_pretrained
from dalle_ar.config import DVAEConfig, run_cli
from dalle_ar.data.shards import SkipCounter, batches, image_text_dataset, write_token_shards
from dvae import DiscreteVAE


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dVAE export directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="image shard directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="output directory for token shards")
    p.add_argument("--batch_size", type=int, default=256, help="(default: 256)")
    p.add_argument("--samples_per_shard", type=int, default=10000, help="(default: 10000)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model, config = load_pretrained(args.dvae, lambda c: DiscreteVAE(DVAEConfig(**c["dvae"])), args.device)
    dcfg = DVAEConfig(**config["dvae"])
    skips = SkipCounter()
    loader = batches(image_text_dataset(args.data, dcfg.image_size, skips=skips), args.batch_size)

    def examples():
        with tqdm(desc="encode", unit="img", mininterval=1.0) as bar:
            for images, texts, keys in loader:
                codes = model.encode(images.to(args.device)).cpu().numpy()
                for key, c, t in zip(keys, codes, texts):
                    yield key, c, t
                bar.update(len(keys))

    n = write_token_shards(examples(), args.out, args.samples_per_shard)
    meta = {"num_samples": n, "dvae": str(Path(args.dvae).resolve()), "num_tokens": dcfg.num_tokens,
            "grid_size": dcfg.grid_size, "skipped": skips.counts}
    (Path(args.out) / "meta.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))
    return Path(args.out)


if __name__ == "__main__":
    run_cli(main)
