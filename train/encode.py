#!/usr/bin/env python
"""Encode image shards to token shards with a trained dVAE (codes for the transformer).

  python train/encode.py --dvae runs/dvae/export --data data/shapes --out data/shapes_tokens
Each input shard NAME.tar becomes <out>/NAME.tar, whose samples hold KEY.codes.npy (grid of uint16
codes) and KEY.txt (the caption). Finished shards are recorded in <out>/progress/, so rerunning the same
command after a crash encodes only the shards not yet done; <out>/meta.json sums over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dalle_ar import models
from dalle_ar.checkpoint import weights_sha256
from dalle_ar.cli import run_cli
from dalle_ar.config import ConfigError, save_json
from dalle_ar.data.read import shard_urls
from dalle_ar.data.write import TokenShards
from dvae.config import DVAEConfig


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dVAE export directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="image shard directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="output directory for token shards")
    p.add_argument("--batch_size", type=int, default=256, help="(default: 256)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader processes reading and decoding whole shards; 0 reads in this process "
                        "(default: min(8, CPU count))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast is faster on GPUs but can flip the argmax where two codes nearly tie "
                        "(default: fp32)")
    args = p.parse_args(argv)

    urls = shard_urls(args.data)
    model, config = models.load(args.dvae, args.device, kind="dvae")
    # its kernels laid out as the activations are (DiscreteVAE.logits): oneDNN convolves without reordering them at
    # every batch. The demo's 20,000 images: the same codes as contiguous kernels, ~15% less time on one CPU thread
    model.to(memory_format=torch.channels_last)
    dcfg = DVAEConfig(**config["dvae"])
    if dcfg.num_tokens > 2 ** 16:
        raise ConfigError(f"{Path(args.dvae) / 'config.json'}: num_tokens {dcfg.num_tokens} does not fit the uint16 "
                          f"codes of token shards; use a dVAE with at most 65536 codes")
    fingerprint = weights_sha256(args.dvae)
    device = torch.device(args.device)

    def encode(url, images, captions, keys):
        codes = model.encode(images.to(device, non_blocking=True).float().div_(255))
        out.write(url, keys, codes.cpu().numpy(), captions)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with TokenShards(args.out, urls, str(Path(args.dvae).resolve()), fingerprint) as out, autocast:
        totals = out.process(dcfg.image_size, args.batch_size, args.num_workers, device, encode, "encode", "encoded")

    meta = {"num_samples": totals["num_samples"], "dvae": str(Path(args.dvae).resolve()), "dvae_sha256": fingerprint,
            "num_tokens": dcfg.num_tokens, "grid_size": dcfg.grid_size, "skipped": totals["skipped"],
            "num_shards": totals["num_shards"]}
    save_json(Path(args.out) / "meta.json", meta)
    print(json.dumps(meta))
    return Path(args.out)


if __name__ == "__main__":
    run_cli(main)
