#!/usr/bin/env python
"""Generate N candidates per prompt with the DALL-E transformer, rank them (CLIP or the transformer's own
likelihood), keep the top k (DALL-E section 2.6).

  python sample/generate.py --dalle runs/dalle/export --clip runs/clip/export \\
      --prompt "a large red circle on the left" --prompts prompts.txt \\
      --num-candidates 64 --top-k-rerank 8 --cond-scale 3 --out outputs/samples

Prompts: --prompt TEXT (repeatable), --prompts FILE (one per line; alias --prompts_file), and/or
  --synthetic_prompts N held-out shapes-world captions (those are also checked against their pixels).
Sampling: --temperature, --top-k (a token count, 0 = off), --top-p (0 = off), --seed (same seed, batch size
  and device -> same images), --cond-scale S (classifier-free guidance; needs a model trained with
  --null_cond_prob > 0; 1 = off), --batch-size (rows per forward; guidance runs 2 rows per candidate),
  --compile (torch.compile the decode step; CUDA graphs on CUDA). CUDA runs in bf16.
unCLIP backend (DALL-E 2; dalle_ar/unclip): --backend unclip --prior PRIOR_EXPORT --decoder DECODER_EXPORT
  [--upsampler EXPORT] --prior-steps 64 --decoder-steps 64 (DDIM steps) --prior-guidance 1 --decoder-guidance 3
  (classifier-free, 1 = off); the same ranking and outputs (no likelihood ranking, priming or inpainting).
Priming and inpainting (an input image, encoded with the dVAE):
  --prime-image x.png --prime-rows R     keep the top R rows of its code grid, sample the rest
  --prime-image x.png --inpaint-box x0,y0,x1,y1   regenerate that box: integers are grid cells (end
                                         exclusive, 0..side), values in [0, 1] with a point are fractions
                                         of the image side (0.25,0.25,0.75,0.75 = the centre quarter)
  --prime-image x.png --inpaint-border N regenerate a border N grid cells wide
  The model is autoregressive: a regenerated cell sees only the known cells before it in raster order.
Ranking: --rank-by clip (cosine similarity; CLIP score = 100 * max(cos, 0)) with --clip EXPORT_DIR or
  --clip-model ARCH --clip-checkpoint /local/weights (an open_clip architecture and a local file; nothing
  is downloaded), or --rank-by likelihood (sum of image-token log-probs under the transformer). Without a
  CLIP, --rank-by clip keeps sampling order.
Outputs in --out:
  grid.png                      the kept top k per prompt, one row per prompt, best first, scores under each
                                (--grid-prompts K: of the first K prompts only)
  candidates.png                all candidates in sampling order (--grid-prompts K: of the first K prompts)
  prompts/NNN/grid.png          all N candidates of prompt NNN, best first, with rank and scores
  prompts/NNN/rank_KK.png       the kept top k of prompt NNN as single images (rank_00 = best)
  scores.json                   summary (seconds per image, device, caption accuracy on shapes prompts) and per
                                prompt: prompt, seed, settings, per-candidate clip_cosine, clip_score,
                                likelihood (when ranked by it), order (best first), top, check results
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dalle_ar.cli import add_config_args, resolve, run_cli
from dalle_ar.clip import ClipScorer, best_first, clip_score
from dalle_ar.config import ConfigError, SampleConfig
from dalle_ar.data import synthetic
from dalle_ar.evaluation import caption_report
from dalle_ar.pipeline import DallePipeline
from dalle_ar.report import device_name, save_grid

BACKENDS = ["ar", "unclip"]


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.exists():
            raise FileNotFoundError(f"{path}: prompts file not found; pass a text file with one prompt per line")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if args.synthetic_prompts:
        # held-out shapes-world captions (a seed the training shards did not use)
        prompts += [synthetic.make_example(i, seed=args.synthetic_seed)[1] for i in range(args.synthetic_prompts)]
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable), --prompts FILE or --synthetic_prompts N")
    return prompts


@torch.no_grad()
def generate_ar(args, cfg: SampleConfig, prompts: list[str], scorer: ClipScorer | None) -> dict:
    """The DALL-E backend (dalle_ar.pipeline.DallePipeline): images (P, N, 3, H, W) in [0, 1], sampling seconds,
    each candidate's CLIP cosine (with a CLIP) and, with --rank-by likelihood, log-likelihood (P, N)."""
    pipe = DallePipeline.load(args.dalle, dvae=args.dvae, clip=scorer, device=args.device)
    known_codes, known_mask = pipe.known_region(cfg, args.prime_image)
    # shapes-world prompts are scored under every ranking (evaluation.caption_report), the likelihood included
    likelihood = cfg.rank_by == "likelihood" or any(synthetic.is_caption(p) for p in prompts)
    return pipe(prompts, cfg, known_codes, known_mask, progress=not args.no_progress, likelihood=likelihood)


@torch.no_grad()
def generate_unclip(args, cfg: SampleConfig, prompts: list[str]) -> dict:
    """The unCLIP backend (dalle_ar/unclip): prior (CLIP text -> image embedding) then the diffusion decoder
    (and the upsampler when given); images (P, N, 3, H, W) in [0, 1] and the sampling seconds."""
    from dalle_ar.unclip.pipeline import UnclipPipeline

    if not (args.prior and args.decoder):
        raise ConfigError("--backend unclip needs --prior <prior export> and --decoder <decoder export> "
                          "(from train/train_prior.py and train/train_decoder.py)")
    pipe = UnclipPipeline.load(args.prior, args.decoder, device=args.device, upsampler_dir=args.upsampler)
    start = time.perf_counter()
    images = pipe.generate(prompts, cfg.num_candidates, seed=cfg.seed, prior_steps=cfg.prior_steps,
                           decoder_steps=cfg.decoder_steps, prior_guidance=cfg.prior_guidance,
                           decoder_guidance=cfg.decoder_guidance, batch_size=cfg.batch_size,
                           progress=not args.no_progress)
    return {"images": images.float(), "seconds": time.perf_counter() - start, "likelihood": None, "clip_cosine": None}


def generate(args, cfg: SampleConfig, prompts: list[str], scorer: ClipScorer | None) -> dict:
    """Dispatch to the sampling backend named by --backend."""
    if args.backend == "ar":
        if not args.dalle:
            raise ConfigError("--backend ar needs --dalle <transformer export directory> (from train/train_dalle.py)")
        return generate_ar(args, cfg, prompts, scorer)
    if args.backend == "unclip":
        return generate_unclip(args, cfg, prompts)
    raise ConfigError(f"--backend {args.backend}: not available; choose one of {BACKENDS}")


def clip_spec(args) -> str | None:
    if args.clip_checkpoint:
        return f"{args.clip_model}:{args.clip_checkpoint}"
    return args.clip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="ar", choices=BACKENDS,
                   help="sampler: ar = the DALL-E transformer (default); unclip = diffusion prior + decoder "
                        "(--prior, --decoder; --prior-steps --decoder-steps --prior-guidance --decoder-guidance)")
    p.add_argument("--dalle", default=None, help="transformer export directory (from train/train_dalle.py), for --backend ar")
    p.add_argument("--prior", default=None, help="unCLIP prior export (train/train_prior.py), for --backend unclip")
    p.add_argument("--decoder", default=None, help="unCLIP decoder export (train/train_decoder.py), for --backend unclip")
    p.add_argument("--upsampler", default=None, help="optional unCLIP upsampler export (train_decoder.py --stage upsampler)")
    p.add_argument("--dvae", default=None, help="dVAE export directory (default: the one the tokens were encoded with)")
    p.add_argument("--clip", default=None, help="CLIP for reranking: an export directory or ARCH:/local/weights")
    p.add_argument("--clip-checkpoint", "--clip_checkpoint", dest="clip_checkpoint", default=None,
                   help="a local open_clip weights file (.safetensors/.pt/.bin) for --clip-model")
    p.add_argument("--clip-model", "--clip_model", dest="clip_model", default="ViT-B-32",
                   help="open_clip architecture of --clip-checkpoint (default: ViT-B-32)")
    p.add_argument("--prompt", action="append", help="a caption; repeat for several")
    p.add_argument("--prompts", "--prompts-file", "--prompts_file", dest="prompts", default=None,
                   help="text file, one prompt per line")
    p.add_argument("--synthetic_prompts", "--synthetic-prompts", type=int, default=0,
                   help="add N held-out shapes-world captions")
    p.add_argument("--synthetic_seed", "--synthetic-seed", type=int, default=synthetic.HELDOUT_SEED, help="world seed for --synthetic_prompts")
    p.add_argument("--prime-image", "--prime_image", dest="prime_image", default=None,
                   help="input image for --prime-rows / --inpaint-box / --inpaint-border")
    p.add_argument("--grid-prompts", "--grid_prompts", dest="grid_prompts", type=int, default=0,
                   help="grid.png and candidates.png show the first K prompts only, a grid one can look at when "
                        "scoring many (default: 0, all)")
    p.add_argument("--out", default="outputs/samples", help="output directory (default: outputs/samples)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true", help="no progress bar")
    add_config_args(p, SampleConfig)
    return p


def tile_label(rank: int, cos: float | None, ll: float | None) -> str:
    parts = [f"#{rank + 1}"]
    if cos is not None:
        parts.append(f"cos {cos:.3f} ({float(clip_score(torch.tensor(cos))):.0f})")
    if ll is not None:
        parts.append(f"ll {ll:.0f}")
    return " ".join(parts)


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        cfg = resolve(args, SampleConfig)
    except ConfigError as e:
        p.error(str(e))
    if args.grid_prompts < 0:
        p.error(f"--grid-prompts {args.grid_prompts}: use 0 (every prompt) or a positive count")
    if cfg.rank_by == "likelihood" and args.backend != "ar":
        p.error("--rank-by likelihood needs --backend ar (the transformer's own likelihood)")
    if args.backend == "unclip" and (args.prime_image or cfg.prime_rows or cfg.inpaint_box or cfg.inpaint_border):
        p.error("priming and inpainting are AR-backend features; for unCLIP edits use sample/unclip_edit.py")
    prompts = read_prompts(args)
    if args.prime_image and not Path(args.prime_image).is_file():
        raise FileNotFoundError(f"{args.prime_image}: prime/inpaint image not found; pass --prime-image with an existing PNG/JPEG")
    spec = clip_spec(args)
    scorer = ClipScorer.load(spec, args.device) if spec else None  # fail on a bad CLIP before sampling

    result = generate(args, cfg, prompts, scorer)
    images, likelihood, cosine = result["images"], result["likelihood"], result["clip_cosine"]
    N, k = cfg.num_candidates, cfg.top_k_rerank
    out = Path(args.out)
    rows, best, best_labels, cosines = [], [], [], []
    for i, (prompt, cands) in enumerate(zip(prompts, images)):
        cos = cosine[i] if cosine is not None else None  # the AR pipeline scores its candidates itself
        if cos is None and scorer is not None:
            cos = scorer.scores(cands, [prompt])[:, 0].cpu()
        ll = likelihood[i] if likelihood is not None else None
        rank_scores = ll if cfg.rank_by == "likelihood" else cos
        order = best_first(rank_scores) if rank_scores is not None else torch.arange(N)
        top = order[:k]
        labels = [tile_label(r, None if cos is None else float(cos[j]), None if ll is None else float(ll[j]))
                  for r, j in enumerate(order.tolist())]
        best.append(cands[top])
        best_labels += labels[:k]
        d = out / "prompts" / f"{i:03d}"
        save_grid(cands[order], d / "grid.png", nrow=min(N, 8), tile_labels=labels, row_labels=None)
        for r, j in enumerate(top.tolist()):
            save_grid(cands[j:j + 1], d / f"rank_{r:02d}.png", nrow=1, scale=1)
        row = {"prompt": prompt, "index": i, "seed": cfg.seed, "order": order.tolist(), "top": top.tolist()}
        if cos is not None:
            row["clip_cosine"] = [round(float(s), 5) for s in cos]
            row["clip_score"] = [round(float(s), 3) for s in clip_score(cos)]
            row["clip_scores"] = row["clip_cosine"]  # earlier name, kept for readers of old reports
        if ll is not None:
            row["likelihood"] = [round(float(s), 3) for s in ll]
        rows.append(row)
        cosines.append(cos)
    checked = [i for i, prompt in enumerate(prompts) if synthetic.is_caption(prompt)]
    caption = None
    if checked:  # the pixel check of every candidate, taken apart by ranking and by attribute
        rankings = {"clip": None if scorer is None else cosines, "likelihood": likelihood}
        ranked = {name: torch.stack([best_first(s[i]) for i in checked]) for name, s in rankings.items() if s is not None}
        ranked["sampling"] = torch.arange(N).expand(len(checked), N)
        caption = caption_report(images[checked], [prompts[i] for i in checked], ranked)
        for j, i in enumerate(checked):
            rows[i]["check"] = caption["check"][j]
            rows[i]["check_top"] = [caption["check"][j][t] for t in rows[i]["top"]]
            rows[i]["attributes"] = caption["attribute_verdicts"][j]

    shown = args.grid_prompts or len(prompts)
    save_grid(torch.cat(best[:shown]), out / "grid.png", nrow=k, row_labels=prompts[:shown],
              tile_labels=best_labels[:shown * k])
    save_grid(images[:shown].flatten(0, 1), out / "candidates.png", nrow=N, row_labels=prompts[:shown])
    seconds = result["seconds"]
    settings = {"backend": args.backend, "dalle": args.dalle, "dvae": args.dvae, "prior": args.prior,
                "decoder": args.decoder, "upsampler": args.upsampler, "clip": spec,
                "prime_image": args.prime_image, "device": args.device, **asdict(cfg)}
    summary = {
        "num_prompts": len(prompts), "num_candidates": N, "top_k_rerank": k, "rank_by": cfg.rank_by,
        "reranked_with": spec if cfg.rank_by == "clip" else "likelihood", "cond_scale": cfg.cond_scale,
        "sampling_seconds": round(seconds, 3), "seconds_per_image": round(seconds / images.shape[0] / N, 5),
        "device": device_name(args.device), "sample_config": asdict(cfg),
    }
    if caption is not None:
        checked_rows = [rows[i] for i in checked]
        summary["caption_accuracy_reranked"] = float(np.mean([x for r in checked_rows for x in r["check_top"]]))
        summary["caption_accuracy_all"] = float(np.mean([x for r in checked_rows for x in r["check"]]))
        summary["caption_accuracy_top1"] = float(np.mean([r["check_top"][0] for r in checked_rows]))
        summary["caption"] = {k: v for k, v in caption.items() if k not in ("check", "attribute_verdicts")}
    report = {"summary": summary, "settings": settings, "prompts": rows}
    (out / "scores.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out / 'grid.png'}, {out / 'prompts'}/NNN/{{grid,rank_KK}}.png, {out / 'scores.json'}")
    return report


if __name__ == "__main__":
    run_cli(main)
