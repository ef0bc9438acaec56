#!/usr/bin/env python
"""dVAE reconstruction quality on a held-out split: PSNR, SSIM, codebook usage and perplexity.

  python -m bench.dvae_quality --dvae runs/dvae/export --synthetic 1024
  python -m bench.dvae_quality --dvae runs/openai_dvae --data 'val/{000000..000009}.tar'
Reconstructions use hard codes (argmax -> decode), as the transformer sees them. Codebook usage is the
fraction of the K codes that occur anywhere in the split; perplexity is exp(entropy of their histogram).
On the shapes world it also reports how many reconstructions still satisfy their caption (`check`).
Targets (issue #3, 64px synthetic): PSNR >= 30 dB, usage >= 90%.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import dvae_quality, emit, synthetic_batches
from dalle_ar import models
from dalle_ar.cli import run_cli
from dalle_ar.data import synthetic
from dalle_ar.data.read import batches, image_text_dataset
from dalle_ar.report import device_name

TARGETS = {"psnr_db": 30.0, "codebook_usage": 0.9}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dVAE export directory (config.json + model.safetensors)")
    p.add_argument("--data", default=None, help="held-out image shards (dir, glob or brace pattern)")
    p.add_argument("--synthetic", type=int, default=1024, help="without --data: this many held-out shapes-world images")
    p.add_argument("--seed", type=int, default=synthetic.HELDOUT_SEED,
                   help="shapes-world seed of the held-out split (training uses 0)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", default=None, help="also save original | reconstruction pairs here (PNG)")
    p.add_argument("--out", default=None, help="also write the JSON here (e.g. bench/results/dvae_quality_tiny.json)")
    args = p.parse_args(argv)

    model, _ = models.load(args.dvae, args.device, kind="dvae")
    size = model.config.image_size
    if args.data:
        loader, split = batches(image_text_dataset(args.data, size), args.batch_size), args.data
    else:
        loader, split = synthetic_batches(args.synthetic, args.seed, size, args.batch_size), f"synthetic seed {args.seed}"
    result = {"bench": "dvae_quality", "device": device_name(args.device), "dvae": args.dvae, "split": split,
              **dvae_quality(model, loader, args.device, args.grid)}
    result["targets"] = TARGETS
    result["meets_targets"] = all(result[k] >= v for k, v in TARGETS.items())
    return emit(result, args.out)


if __name__ == "__main__":
    run_cli(main)
