"""Shared by the benchmarks: how a result is printed and recorded, and the dVAE reconstruction quality that
bench/dvae_quality.py reports and bench/dvae_recipes.py compares recipes by."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dalle_ar.data import synthetic
from dalle_ar.report import save_grid
from dvae import DiscreteVAE
from dvae.loss import codebook_usage
from dvae.metrics import psnr, ssim


def emit(result: dict, out: str | None, echo: bool = True) -> dict:
    """Print one JSON line (unless echo=False: a partial result written as a run goes); also write it
    (pretty) to `out`, e.g. bench/results/NAME.json."""
    if echo:
        print(json.dumps(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def synthetic_batches(num: int, seed: int, image_size: int, batch_size: int):
    """Held-out shapes-world (images in [0, 1], captions) batches of world seed `seed`."""
    for start in range(0, num, batch_size):
        pairs = [synthetic.make_example(i, seed=seed, image_size=image_size) for i in range(start, min(num, start + batch_size))]
        images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in pairs]).float() / 255
        yield images, [t for _, t in pairs]


@torch.no_grad()
def dvae_quality(model: DiscreteVAE, loader, device: str, grid_path: str | None = None) -> dict:
    """PSNR, SSIM, codebook usage and perplexity of hard-code reconstructions (bench/dvae_quality.py's docstring)
    over `loader`'s (images, texts, ...) batches; caption accuracy of the reconstructions on shapes-world captions."""
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
