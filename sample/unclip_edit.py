#!/usr/bin/env python
"""unCLIP image manipulations (DALL-E 2 section 3): variations, interpolations and text diffs, as grids.

  python sample/unclip_edit.py --prior runs/prior/export --decoder runs/decoder/export --out outputs/edit \\
      variations --image photo.png --n 8
  python sample/unclip_edit.py ... interpolate --image a.png --image b.png --steps 8
  python sample/unclip_edit.py ... text_diff --image a.png --from "a red circle" --to "a blue circle" --steps 6
`--synthetic I` instead of `--image FILE` renders shapes-world image I (held-out seed 1) for a quick look.
Writes <out>/<operation>.png (the input image(s) first, then the results) and <out>/<operation>.json (the
CLIP cosine of each result to the input's image embedding, and for text diffs to the target caption).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from dalle_ar.cli import run_cli
from dalle_ar.config import save_json
from dalle_ar.data import synthetic
from dalle_ar.data.decode import image_to_tensor
from dalle_ar.report import device_name, save_grid
from dalle_ar.unclip.pipeline import UnclipPipeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, help="prior export directory (train/train_prior.py)")
    p.add_argument("--decoder", required=True, help="decoder export directory (train/train_decoder.py)")
    p.add_argument("--upsampler", default=None, help="upsampler export directory (train_decoder.py --stage upsampler)")
    p.add_argument("--clip", default=None, help="CLIP export dir or ARCH:/weights (default: the prior's)")
    p.add_argument("--out", default="outputs/unclip_edit", help="output directory (default: outputs/unclip_edit)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decoder_steps", "--decoder-steps", type=int, default=64, help="DDIM steps (default: 64)")
    p.add_argument("--decoder_guidance", "--decoder-guidance", type=float, default=3.0, help="(default: 3)")
    ops = p.add_subparsers(dest="op", required=True)
    for name, help_text in (("variations", "images sharing the input's CLIP image embedding"),
                            ("interpolate", "slerp between two images' embeddings, fixed decoder noise"),
                            ("text_diff", "move the image embedding along a caption difference")):
        op = ops.add_parser(name, help=help_text)
        op.add_argument("--image", action="append", default=[], help="input image file (interpolate: twice)")
        op.add_argument("--synthetic", type=int, action="append", default=[], help="shapes-world image index instead")
        if name == "variations":
            op.add_argument("--n", type=int, default=8, help="number of variations (default: 8)")
            op.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0: the variations differ; default 1)")
        else:
            op.add_argument("--steps", type=int, default=8 if name == "interpolate" else 6, help="points along the path")
        if name == "text_diff":
            op.add_argument("--from", dest="caption_from", required=True, help="caption describing the input")
            op.add_argument("--to", dest="caption_to", required=True, help="caption to move towards")
            op.add_argument("--max_theta", type=float, default=0.5, help="largest slerp weight (paper: 0.5)")
            op.add_argument("--no_invert", action="store_true", help="fixed random noise instead of DDIM inversion")
    return p


def load_images(args, size: int) -> list[torch.Tensor]:
    images = []
    for path in args.image:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: image not found; pass an existing --image file or --synthetic INDEX")
        images.append(image_to_tensor(Image.open(path), size))
    images += [image_to_tensor(synthetic.make_example(i, seed=1)[0], size) for i in args.synthetic]
    need = 2 if args.op == "interpolate" else 1
    if len(images) != need:
        raise FileNotFoundError(f"{args.op} takes {need} input image(s), got {len(images)}: pass --image FILE "
                                f"or --synthetic INDEX {'twice' if need == 2 else 'once'}")
    return images


def main(argv=None) -> Path:
    args = build_parser().parse_args(argv)
    pipe = UnclipPipeline.load(args.prior, args.decoder, args.clip, args.device, args.upsampler)
    images = load_images(args, pipe.input_size)  # CLIP sees them at its own size
    common = dict(seed=args.seed, guidance=args.decoder_guidance)
    if args.op == "variations":
        out = pipe.variations(images[0], args.n, steps=args.decoder_steps, eta=args.eta, **common)
    elif args.op == "interpolate":
        out = pipe.interpolate(images[0], images[1], args.steps, decoder_steps=args.decoder_steps, **common)
    else:
        out = pipe.text_diff(images[0], args.caption_from, args.caption_to, args.steps, max_theta=args.max_theta,
                             decoder_steps=args.decoder_steps, invert=not args.no_invert, **common)
    source = pipe.image_embed(images[0][None])
    record = {"op": args.op, "device": device_name(args.device), "seed": args.seed,
              "cosine_to_input": (pipe.image_embed(out) @ source.T)[:, 0].tolist()}
    if args.op == "text_diff":
        record["cosine_to_target_caption"] = pipe.clip.scores(out, [args.caption_to])[:, 0].tolist()
    outdir = Path(args.out)
    shown = torch.nn.functional.interpolate(torch.stack(images), size=out.shape[-2:], mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
    grid = save_grid(torch.cat([shown, out]), outdir / f"{args.op}.png",
                     nrow=len(images) + len(out))
    save_json(outdir / f"{args.op}.json", record)
    print(json.dumps({"grid": str(grid), **record}))
    return grid


if __name__ == "__main__":
    run_cli(main)
