#!/usr/bin/env python
"""Caption accuracy of unCLIP (prior + decoder [+ upsampler]) on held-out shapes-world prompts, one- and two-object
prompts apart, and where its errors come from:

  text       caption -> prior -> decoder: what a user gets (per candidate, oracle, CLIP top-1 of the candidates)
  decoder    the decoder alone, from the true CLIP image embedding of a render of the same caption: the ceiling
             the prior can reach (a wrong image here is the decoder's fault, or the embedding's)
  caption_only  a decoder that reads the caption, from the caption alone (its null image embedding; GLIDE's
             conditioning from the same network): whether the image embedding helps or hurts, e.g. at binding two
             objects' attributes, which the unCLIP paper finds its decoder worse at than GLIDE
  prior_cos  cosine between the prior's image embedding and the render's true one (the prior's fit)
  upsampler_alone  with --upsampler: the upsampler alone, from the renders shrunk to its input size, against the bilinear
             resize of the same inputs: caption accuracy, PSNR to the render, background tint

--text_guidance T adds, at each decoder guidance S, the settings "g=S,gt=T": the caption guided on its own scale T
beside the image embedding's S (diffusion.guided; T = S is plain guidance).

Every image set also reports its background tint: per image, the median RGB distance (0-255) of its pixels from the
world's background colour (shapes cover at most about a third of an image, so the median pixel is background; a render
scores 0). `synthetic.check` does not look at the background, so this is what catches a tinted one.

  python -m bench.unclip_accuracy --prior runs/prior/export --decoder runs/decoder/export \\
      --prompts 64 --candidates 4 --guidance 1,3 --out bench/results/unclip_accuracy_cpu.json

Images smaller than the world's 64 px are resized to 64 (bilinear) before `synthetic.check`, and the record says so.
The prompts are the demo's (`synthetic.heldout`, the first --prompts; --first_prompt 64 gives a development set).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import emit
from dvae.metrics import psnr
from dalle_ar.data import synthetic
from dalle_ar.evaluation import caption_report
from dalle_ar.report import device_name, save_grid
from dalle_ar.unclip.pipeline import UnclipPipeline

WORLD_SIZE = 64


def summary(report: dict) -> dict:
    """The figures of evaluation.caption_report that judge unCLIP, overall and by number of objects."""
    keys = ("prompts", "candidates", "per_candidate", "oracle", "top1", "attributes")
    out = {k: report[k] for k in keys}
    out["by_objects"] = {n: {k: r[k] for k in keys} for n, r in report["by_objects"].items()}
    return out


def at_world_size(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 3, 64, 64): bilinear when the model makes another size."""
    if images.shape[-1] == WORLD_SIZE:
        return images
    flat = images.flatten(0, -4)
    flat = F.interpolate(flat, size=(WORLD_SIZE, WORLD_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return flat.view(*images.shape[:-2], WORLD_SIZE, WORLD_SIZE)


def background_tint(images: torch.Tensor) -> np.ndarray:
    """Per image (flattened over leading dims), the median RGB distance (0-255) of its pixels from the background."""
    flat = images.reshape(-1, *images.shape[-3:]).float() * 255
    background = torch.tensor(synthetic.BACKGROUND, dtype=torch.float32)[:, None, None]
    return (flat - background).norm(dim=1).flatten(1).median(dim=1).values.numpy()


def tint_summary(images: torch.Tensor) -> dict:
    tint = background_tint(images)
    return {"mean": round(float(tint.mean()), 2), "max": round(float(tint.max()), 2),
            "over_10": round(float((tint > 10).mean()), 4)}


def upsampler_alone(pipe: UnclipPipeline, renders: torch.Tensor, prompts: list[str], steps: int, seed: int,
                    batch_size: int, progress: bool) -> dict:
    """The upsampler from the renders shrunk to its input size, against the bilinear resize of the same inputs."""
    up = pipe.upsampler
    cond = up.condition(low_res=renders)
    low = (cond["low_res"] + 1) / 2  # the renders at the upsampler's input size
    g = torch.Generator().manual_seed(seed)
    out = torch.cat([up.sample(low_res=low[i:i + batch_size].to(pipe.device), steps=steps, generator=g,
                               progress=progress).cpu() for i in range(0, len(low), batch_size)])
    bilinear = ((up.resized_low_res(cond) + 1) / 2).clamp(0, 1)  # the resize the upsampler itself conditions on
    sampling = {"sampling": np.zeros((len(prompts), 1), dtype=np.int64)}
    result = {"input_size": up.config.low_res_size, "residual": up.config.low_res_residual}
    for name, images in (("upsampled", out), ("bilinear", bilinear)):
        images = at_world_size(images)
        result[name] = {**summary(caption_report(images[:, None], prompts, sampling)),
                        "psnr": round(float(psnr(images, renders).mean()), 2), "background_tint": tint_summary(images)}
    return result


def clip_order(pipe: UnclipPipeline, images: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """(P, N) candidate indices by CLIP similarity to the prompt, best first."""
    p, n = images.shape[:2]
    img = pipe.clip.encode_images(images.flatten(0, 1).to(pipe.device)).view(p, n, -1)
    txt = pipe.clip.encode_texts(prompts).to(img.device)
    return torch.argsort((img * txt[:, None]).sum(-1), dim=1, descending=True).cpu().numpy()


def decoded_report(pipe: UnclipPipeline, embeds: torch.Tensor | None, prompts: list[str], args, scale: float,
                   text_scale: float | None) -> dict:
    """The figures of --candidates decodes per prompt from its embedding (None: from its caption alone), with the
    noise seed of the text -> prior -> decoder run, in sampling order."""
    n, bs = args.candidates, args.batch_size
    g = torch.Generator().manual_seed(args.seed)
    rows = [pipe.decode(None if embeds is None else embeds[i:i + bs].repeat_interleave(n, 0).to(pipe.device),
                        [c for c in prompts[i:i + bs] for _ in range(n)], steps=args.steps, guidance=scale,
                        text_guidance=text_scale, generator=g, progress=not args.no_progress).cpu()
            for i in range(0, len(prompts), bs)]
    images = at_world_size(torch.cat(rows).view(len(prompts), n, *rows[0].shape[1:]))
    order = {"sampling": np.tile(np.arange(n), (len(prompts), 1))}
    return {**summary(caption_report(images, prompts, order)), "background_tint": tint_summary(images)}


@torch.no_grad()
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="prior export (train/train_prior.py)")
    p.add_argument("--decoder", required=True, help="decoder export (train/train_decoder.py)")
    p.add_argument("--upsampler", default=None, help="upsampler export (train/train_decoder.py --stage upsampler)")
    p.add_argument("--clip", default=None, help="the CLIP the embeddings came from (default: the prior's config)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--first_prompt", type=int, default=0, help="64: held-out prompts after the demo's 64 (development)")
    p.add_argument("--candidates", type=int, default=4, help="images per prompt and setting")
    p.add_argument("--guidance", default="1,3", help="decoder guidance scales")
    p.add_argument("--text_guidance", default="",
                   help="also, at each --guidance scale, these scales for the caption on its own (a decoder that reads "
                        "the caption; diffusion.guided): settings 'g=S,gt=T'")
    p.add_argument("--prior_guidance", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=32, help="DDIM steps of the prior and the decoder")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", default=None, help="PNG: per prompt (first 8) its text candidates at the last setting")
    p.add_argument("--out", default=None)
    p.add_argument("--no_progress", action="store_true", help="no progress bars (they go to stderr)")
    args = p.parse_args(argv)
    pipe = UnclipPipeline.load(args.prior, args.decoder, args.clip, args.device, args.upsampler)
    examples = synthetic.heldout(args.first_prompt + args.prompts)[args.first_prompt:]
    prompts = [c for _, c in examples]
    renders = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in examples]).float() / 255
    n = args.candidates
    result = {"bench": "unclip_accuracy", "device": device_name(args.device), "prior": args.prior,
              "decoder": args.decoder, "decoder_config": asdict(pipe.decoder.config), "upsampler": args.upsampler,
              "image_size": pipe.image_size,
              "checked_at": WORLD_SIZE, "resized": pipe.image_size != WORLD_SIZE, "prompts": args.prompts,
              "first_prompt": args.first_prompt, "candidates": n, "steps": args.steps, "seed": args.seed,
              "prior_guidance": args.prior_guidance, "text": {}, "decoder_only": {}}
    start = time.perf_counter()

    # the prior's fit: its embedding against the true embedding of a render of the caption
    true_embed, text_embed = pipe.image_embed(renders).cpu(), pipe.clip.encode_texts(prompts).cpu()
    g = torch.Generator().manual_seed(args.seed)
    z = pipe.prior.sample(pipe.tokenizer.encode(prompts).to(pipe.device), text_embed.to(pipe.device),
                          steps=args.steps, guidance=args.prior_guidance, candidates=2, generator=g).cpu()
    result["prior_cos"] = float(F.cosine_similarity(z, true_embed).mean())
    result["text_embed_cos"] = float(F.cosine_similarity(text_embed, true_embed).mean())

    scales = [float(s) for s in args.guidance.split(",")]
    text_scales = [float(s) for s in args.text_guidance.split(",") if s]
    if text_scales and not pipe.decoder.config.use_caption:
        p.error(f"--text_guidance needs a decoder that reads the caption; {args.decoder} was trained without --use_caption")
    settings = [(s, None) for s in scales] + [(s, t) for s in scales for t in text_scales]
    for scale, text_scale in settings:
        key = f"g={scale:g}" if text_scale is None else f"g={scale:g},gt={text_scale:g}"
        images = at_world_size(pipe.generate(prompts, n, seed=args.seed, prior_steps=args.steps,
                                             decoder_steps=args.steps, prior_guidance=args.prior_guidance,
                                             decoder_guidance=scale, decoder_text_guidance=text_scale,
                                             batch_size=args.batch_size, progress=not args.no_progress))
        orders = {"clip": clip_order(pipe, images, prompts), "sampling": np.tile(np.arange(n), (len(prompts), 1))}
        result["text"][key] = {**summary(caption_report(images, prompts, orders)),
                               "background_tint": tint_summary(images)}
        # the decoder alone, from the renders' own embeddings, then (a decoder that reads it) the caption alone
        result["decoder_only"][key] = decoded_report(pipe, true_embed, prompts, args, scale, text_scale)
        if pipe.decoder.config.use_caption and text_scale is None:
            result.setdefault("caption_only", {})[key] = decoded_report(pipe, None, prompts, args, scale, None)
        if args.grid:
            save_grid(images[:8].flatten(0, 1), args.grid, nrow=n)
    if pipe.upsampler is not None:
        result["upsampler_alone"] = upsampler_alone(pipe, renders, prompts, args.steps, args.seed, args.batch_size,
                                                    not args.no_progress)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return emit(result, args.out)


if __name__ == "__main__":
    main()
