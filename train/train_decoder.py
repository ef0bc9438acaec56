#!/usr/bin/env python
"""Train the unCLIP decoder (CLIP image embedding -> image) or, on its own, an upsampler stage.

  python train/precompute_clip.py --clip runs/clip/export --data data/shapes --out data/shapes_clip
  python train/train_decoder.py --data data/shapes --embeddings data/shapes_clip --out runs/decoder --steps 5000
  python train/train_decoder.py --stage upsampler --data data/shapes --low_res_size 32 --image_size 64 \\
      --out runs/upsampler --steps 5000
The base decoder reads each image shard beside its embedding shard; `--use_caption` also conditions on
the caption (needs --tokenizer). The upsampler reads only images (no embedding or caption, as in the
paper) and diffuses the image minus its bilinearly resized input (--no-low_res_residual: the paper's plain
upsampler, which a short run leaves with tinted flat colours). Writes <out>/export (EMA weights with
--ema_decay, the default) and sample grids in <out>/samples/ every --sample_every steps and at the end:
originals on top, decoded from their CLIP embeddings below (upsampler: low-res input, upsampled, original).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dalle_ar import models
from dalle_ar.cli import given, parse, run_cli
from dalle_ar.config import ConfigError, DiffusionConfig, TrainConfig, UnetConfig
from dalle_ar.data.embeddings import image_embedding_dataset, read_meta
from dalle_ar.data.read import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank
from dalle_ar.report import save_grid
from dalle_ar.text import TextTokenizer
from dalle_ar.unclip.decoder import UnetDecoder

STAGES = ("base", "upsampler")


def extra_args(p):
    p.add_argument("--stage", choices=STAGES, default="base", help="base decoder (default) or upsampler")
    p.add_argument("--embeddings", default=None, help="embedding shards from train/precompute_clip.py (base stage)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (with --use_caption)")
    p.add_argument("--sample_steps", type=int, default=32, help="DDIM steps for the sample grids (default: 32)")
    p.add_argument("--sample_guidance", type=float, default=3.0, help="guidance scale for the grids (default: 3)")
    p.add_argument("--num_samples", type=int, default=8, help="images in each sample grid (default: 8)")
    p.add_argument("--dry_run", default=None, metavar="PATH", help=models.DRY_RUN_HELP)


def stage_config(args, unet: UnetConfig, meta: dict | None, tok: TextTokenizer | None) -> UnetConfig:
    if args.stage == "upsampler":
        if not 0 < unet.low_res_size < unet.image_size:
            raise ConfigError(f"--stage upsampler needs 0 < --low_res_size < --image_size (got {unet.low_res_size}, "
                              f"{unet.image_size}); e.g. --low_res_size 64 --image_size 256 (paper's first upsampler)")
        # the paper's upsamplers see only the low-res image; this script diffuses the residual over it unless told
        # --no-low_res_residual (the paper's): a short plain run tints flat colours (README, "unCLIP backend")
        residual = unet.low_res_residual if given(args, "low_res_residual") else True
        return replace(unet, embed_dim=0, use_caption=False, low_res_residual=residual)
    if unet.low_res_size or unet.low_res_residual:
        raise ConfigError("--low_res_size and --low_res_residual are for --stage upsampler; drop them for the base decoder")
    unet = replace(unet, embed_dim=meta["embed_dim"])
    return replace(unet, text_vocab_size=tok.vocab_size) if tok else unet


# v-prediction (Salimans & Ho 2022) by default: with eps, short runs drift in low-frequency colour (the shapes
# world's flat background came out in random colours after 1,500 steps; with v it is right after 500).
DEFAULTS = {TrainConfig: dict(ema_decay=0.999), DiffusionConfig: dict(target="v")}


def main(argv=None):
    args, (unet_cfg, diffusion_cfg, cfg) = parse(__doc__, UnetConfig, DiffusionConfig, TrainConfig, extra=extra_args,
                                                 argv=argv, defaults=DEFAULTS)
    base = args.stage == "base"
    if base and not args.embeddings:
        raise ConfigError("--embeddings DIR is required for the base decoder: compute them with "
                          "`python train/precompute_clip.py --clip <clip> --data <shards> --out DIR`")
    if unet_cfg.use_caption and not args.tokenizer:
        raise ConfigError("--use_caption needs --tokenizer (the project BPE from train/train_tokenizer.py)")
    meta = read_meta(args.embeddings) if base else None
    tok = TextTokenizer.load(args.tokenizer, unet_cfg.text_len) if (unet_cfg.use_caption and base) else None
    unet_cfg = stage_config(args, unet_cfg, meta, tok)
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = UnetDecoder(unet_cfg, diffusion_cfg)
    extra = {"tokenizer.json": str(Path(args.tokenizer) / "tokenizer.json") if not args.tokenizer.endswith(".json")
             else args.tokenizer} if tok else {}
    export_config = models.export_config("unclip_decoder", model, stage=args.stage, clip=meta["clip"] if meta else None)
    if args.dry_run:
        return models.write_dry_run(args.dry_run, export_config, cfg.batch_size, cfg.grad_accum)
    trainer = Trainer(model, cfg, name=f"decoder-{args.stage}" if not base else "decoder", extra_files=extra,
                      export_config=export_config)
    size = unet_cfg.image_size
    if base:
        data = image_embedding_dataset(cfg.data, args.embeddings, size, shuffle=1000, seed=cfg.seed + rank())
        encode = (lambda captions: tok.encode(list(captions))) if tok else (lambda captions: None)
        stream = ((images, zi, encode(captions)) for images, captions, zi, _, _ in
                  infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False)))
        fixed = next(iter(image_embedding_dataset(cfg.data, args.embeddings, size, shuffle=0, seed=12345)
                          .batched(args.num_samples)))
        fixed = (fixed[0], fixed[2], encode(fixed[1]))
    else:
        data = image_text_dataset(cfg.data, size, resampled=True, shuffle=1000, seed=cfg.seed + rank())
        stream = ((images, None, None) for images, _, _ in
                  infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False)))
        fixed = (next(iter(image_text_dataset(cfg.data, size).batched(args.num_samples)))[0], None, None)

    def sample_grid(tr: Trainer) -> None:
        shadow = UnetDecoder(unet_cfg, diffusion_cfg).to(tr.device).eval()  # fp32 copy with the EMA weights
        shadow.load_state_dict({k: v.float() for k, v in tr.module.state_dict().items()})
        if tr.ema is not None:
            shadow.load_state_dict(tr.ema.state_dict(), strict=False)
        images, zi, text = (None if b is None else b.to(tr.device) for b in fixed)
        g = torch.Generator().manual_seed(0)
        if base:
            out = shadow.sample(zi, text, steps=args.sample_steps, guidance=args.sample_guidance, generator=g)
            rows = [images, out]
        else:
            low = shadow.condition(low_res=images)["low_res"].add(1).div(2)
            out = shadow.sample(low_res=low, steps=args.sample_steps, generator=g)
            rows = [torch.nn.functional.interpolate(low, size=size, mode="nearest"), out, images]
        if tr.is_main:
            path = save_grid(torch.cat(rows).cpu(), Path(cfg.out) / "samples" / f"step_{tr.step:08d}.png",
                             nrow=len(images))
            tr.log_image("samples", path)

    def on_step(tr: Trainer) -> None:
        if tr.preview_due():
            sample_grid(tr)  # the last grid too: inside fit, while wandb is still open

    def loss_fn(engine, batch, step):
        images, zi, text = batch
        inputs, target = trainer.module.training_inputs(images, zi, text)
        return trainer.module.loss_from_output(engine(*inputs), target)

    return trainer.fit(stream, loss_fn, on_step=on_step)


if __name__ == "__main__":
    run_cli(main)
