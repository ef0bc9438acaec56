#!/usr/bin/env python
"""dVAE reconstruction quality on a held-out split: PSNR, SSIM, codebook usage and perplexity.

  python -m bench.dvae_quality --dvae runs/dvae/export --synthetic 1024 --seed 12345
  python -m bench.dvae_quality --dvae runs/openai_dvae --data 'val/{000000..000009}.tar'
Reconstructions use hard codes (argmax -> decode), as the transformer sees them. Codebook usage is the
fraction of the K codes that occur anywhere in the split; perplexity is exp(entropy of their histogram).
On the shapes world it also reports how many reconstructions still satisfy their caption (`check`).
Targets (issue #3, 64px synthetic): PSNR >= 30 dB, usage >= 90%.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from bench.common import emit
from dalle_ar import models
from dalle_ar.config import run_cli
from dalle_ar.data import synthetic
from dalle_ar.data.shards import batches, image_text_dataset
from dalle_ar.report import device_name, save_grid
from dvae import DiscreteVAE
from dvae.loss import codebook_usage
from dvae.metrics import psnr, ssim

TARGETS = {"psnr_db": 30.0, "codebook_usage": 0.9}


def synthetic_batches(num: int, seed: int, image_size: int, batch_size: int):
    for start in range(0, num, batch_size):
        pairs = [synthetic.make_example(i, seed=seed, image_size=image_size) for i in range(start, min(num, start + batch_size))]
        images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in pairs]).float() / 255
        yield images, [t for _, t in pairs]


@torch.no_grad()
def evaluate(model: DiscreteVAE, loader, device: str, grid_path: str | None = None) -> dict:
    cfg = model.config
    psnrs, ssims, codes_all, correct, checked = [], [], [], 0, 0
    first = None
    for images, texts, *_ in tqdm(loader, desc="dvae quality", unit="batch"):
        x = images.to(device)
        codes = model.encode(x)
        recon = model.decode(codes).clamp(0, 1)
        psnrs.append(psnr(recon, x).cpu())
        ssims.append(ssim(recon, x).cpu())
        codes_all.append(codes.cpu())
        if all(synthetic.is_caption(t) for t in texts):
            correct += sum(synthetic.check_batch(recon.cpu(), list(texts)))
            checked += len(texts)
        if first is None:
            first = torch.stack([images[:16].float(), recon[:16].cpu()], dim=1).flatten(0, 1)
    p, s = torch.cat(psnrs), torch.cat(ssims)
    used, perplexity = codebook_usage(torch.cat(codes_all), cfg.num_tokens)
    result = {"images": len(p), "psnr_db": round(p.mean().item(), 3), "psnr_db_median": round(p.median().item(), 3),
              "ssim": round(s.mean().item(), 4), "codebook_usage": round(used, 4), "codes_used": round(used * cfg.num_tokens),
              "perplexity": round(perplexity, 1), "num_tokens": cfg.num_tokens, "image_size": cfg.image_size}
    if checked:
        result["recon_caption_accuracy"] = round(correct / checked, 4)
    if grid_path and first is not None:
        save_grid(first, grid_path, nrow=8)
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="dVAE export directory (config.json + model.safetensors)")
    p.add_argument("--data", default=None, help="held-out image shards (dir, glob or brace pattern)")
    p.add_argument("--synthetic", type=int, default=1024, help="without --data: this many held-out shapes-world images")
    p.add_argument("--seed", type=int, default=12345, help="shapes-world seed of the held-out split (training uses 0)")
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
              **evaluate(model, loader, args.device, args.grid)}
    result["targets"] = TARGETS
    result["meets_targets"] = all(result[k] >= v for k, v in TARGETS.items())
    return emit(result, args.out)


if __name__ == "__main__":
    run_cli(main)
