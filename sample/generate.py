#!/usr/bin/env python
"""Generate N candidates per prompt with the DALL-E transformer, rerank them with CLIP, keep the top k.

  python sample/generate.py --dalle runs/dalle/export --clip runs/clip/export \\
      --prompt "a large red circle on the left" --prompt "a small blue square above a large green triangle" \\
      --num_candidates 64 --top_k_rerank 8 --out outputs/samples
Writes <out>/grid.png (one row per prompt, best first), <out>/candidates.png (all, in sampling order) and
<out>/scores.json (CLIP scores, and for shapes-world prompts the pixel check of every image).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dalle_ar.checkpoint import load_pretrained
from dalle_ar.clip import ClipScorer
from dalle_ar.config import DalleConfig, DVAEConfig, SampleConfig, add_config_args, resolve, run_cli
from dalle_ar.data import synthetic
from dalle_ar.model import DalleTransformer
from dalle_ar.report import device_name, save_grid
from dalle_ar.sampling import generate_codes
from dalle_ar.text import TextTokenizer
from dvae import DiscreteVAE


def load_dalle(path: str, device: str):
    model, cfg = load_pretrained(path, lambda c: DalleTransformer(DalleConfig(**c["model"])), device)
    tok = TextTokenizer.load(Path(path) / "tokenizer.json", model.config.text_len)
    return model, tok, cfg


def load_dvae(path: str, device: str) -> DiscreteVAE:
    return load_pretrained(path, lambda c: DiscreteVAE(DVAEConfig(**c["dvae"])), device)[0]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise SystemExit(f"{path}: prompts file not found; pass a text file with one prompt per line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if args.synthetic_prompts:
        # held-out shapes-world captions (a seed the training shards did not use)
        prompts += [synthetic.make_example(i, seed=args.synthetic_seed)[1] for i in range(args.synthetic_prompts)]
    if not prompts:
        raise SystemExit("no prompts: pass --prompt TEXT (repeatable), --prompts_file FILE or --synthetic_prompts N")
    return prompts


@torch.no_grad()
def generate(model, tok, dvae, prompts: list[str], cfg: SampleConfig, device: str):
    """Returns images (P, N, 3, H, W) in [0, 1] and the sampling time in seconds."""
    text = tok.encode(prompts).to(device).repeat_interleave(cfg.num_candidates, dim=0)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    images = []
    start = time.perf_counter()
    for chunk in text.split(cfg.batch_size):
        codes = generate_codes(model, chunk, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
        images.append(dvae.decode(codes).float().cpu())
    seconds = time.perf_counter() - start
    images = torch.cat(images)
    return images.view(len(prompts), cfg.num_candidates, *images.shape[1:]), seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle", required=True, help="transformer export directory (from train/train_dalle.py)")
    p.add_argument("--dvae", default=None, help="dVAE export directory (default: the one the tokens were encoded with)")
    p.add_argument("--clip", default=None, help="CLIP for reranking: an export directory or ARCH:/local/weights; "
                   "without it candidates keep sampling order")
    p.add_argument("--prompt", action="append", help="a caption; repeat for several")
    p.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    p.add_argument("--synthetic_prompts", type=int, default=0, help="add N held-out shapes-world captions")
    p.add_argument("--synthetic_seed", type=int, default=12345, help="world seed for --synthetic_prompts")
    p.add_argument("--out", default="outputs/samples", help="output directory (default: outputs/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_config_args(p, SampleConfig)
    args = p.parse_args(argv)
    cfg = resolve(args, SampleConfig)
    if cfg.top_k_rerank > cfg.num_candidates:
        p.error(f"--top_k_rerank {cfg.top_k_rerank} > --num_candidates {cfg.num_candidates}")

    model, tok, dalle_cfg = load_dalle(args.dalle, args.device)
    dvae_path = args.dvae or dalle_cfg.get("dvae")
    if not dvae_path:
        p.error(f"{args.dalle}/config.json names no dVAE; pass --dvae <dvae export directory>")
    dvae = load_dvae(dvae_path, args.device)
    prompts = read_prompts(args)
    images, seconds = generate(model, tok, dvae, prompts, cfg, args.device)

    scorer = ClipScorer.load(args.clip, args.device) if args.clip else None
    results, best = [], []
    for prompt, cands in zip(prompts, images):
        if scorer is not None:
            scores = scorer.scores(cands, [prompt])[:, 0].cpu()
            order = torch.argsort(scores, descending=True)
        else:
            scores, order = torch.zeros(len(cands)), torch.arange(len(cands))
        top = order[: cfg.top_k_rerank]
        best.append(cands[top])
        row = {"prompt": prompt, "clip_scores": [round(float(s), 4) for s in scores], "top": top.tolist()}
        if synthetic.is_caption(prompt):
            passed = synthetic.check_batch(cands, [prompt] * len(cands))
            row["check"] = [bool(x) for x in passed]
            row["check_top"] = [bool(passed[i]) for i in top]
        results.append(row)

    out = Path(args.out)
    save_grid(torch.cat(best), out / "grid.png", nrow=cfg.top_k_rerank, row_labels=prompts)
    save_grid(images.flatten(0, 1), out / "candidates.png", nrow=cfg.num_candidates, row_labels=prompts)
    summary = {
        "num_prompts": len(prompts), "num_candidates": cfg.num_candidates, "top_k_rerank": cfg.top_k_rerank,
        "reranked_with": args.clip, "sampling_seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / images.shape[0] / images.shape[1], 5),
        "device": device_name(args.device),
        "sample_config": asdict(cfg),
    }
    checked = [r for r in results if "check" in r]
    if checked:
        summary["caption_accuracy_reranked"] = float(np.mean([x for r in checked for x in r["check_top"]]))
        summary["caption_accuracy_all"] = float(np.mean([x for r in checked for x in r["check"]]))
    report = {"summary": summary, "prompts": results}
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'grid.png'}, {out / 'candidates.png'}, {out / 'scores.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
