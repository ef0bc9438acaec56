#!/usr/bin/env python
"""Train the gumbel-softmax dVAE on image shards (DALL-E stage 1) through the DeepSpeed engine.

  python train/train_dvae.py --data data/shapes --out runs/dvae --preset tiny --steps 2000 --lr 3e-3
  deepspeed train/train_dvae.py --preset paper --data 'shards/{000000..000999}.tar' --out runs/dvae --steps 3000000

Defaults are the paper's recipe (appendix A.2): logit-Laplace likelihood, KL weight cosine 0 -> 6.6 over
5k updates, temperature cosine 1 -> 1/16 over 150k, AdamW(0.9, 0.999, wd 1e-4), lr cosine 1e-4 -> 1.25e-6
over 1.2M updates, EMA 0.999, for a 3M-update run; a shorter --steps scales every anneal length
(--reference_steps 0 turns that off). Logs loss terms, tau, beta, codebook usage and perplexity; writes
<out>/samples/recon_XXXXXXXX.png (original | reconstruction pairs) every --sample_every steps,
<out>/export (config.json + model.safetensors, EMA weights) and <out>/reconstruction.json.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.config import TrainConfig, save_json
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank
from dalle_ar.report import save_grid
from dvae import DiscreteVAE
from dvae.config import DVAEConfig, DVAELossConfig
from dvae.loss import codebook_usage, dvae_loss
from dvae.metrics import psnr

# The paper's optimizer (appendix A.2); presets and flags override.
PAPER_OPTIMIZER = dict(lr=1e-4, min_lr_ratio=1.25e-6 / 1e-4, beta1=0.9, beta2=0.999, weight_decay=1e-4,
                       warmup_steps=0, ema_decay=0.999)


def main(argv=None):
    _, (model_cfg, loss_cfg, cfg) = parse(__doc__, DVAEConfig, DVAELossConfig, TrainConfig, argv=argv,
                                          defaults={TrainConfig: PAPER_OPTIMIZER})
    loss_cfg.check_model(model_cfg)
    schedule = loss_cfg.scaled(cfg.steps)
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = DiscreteVAE(model_cfg)
    trainer = Trainer(model, cfg, name="dvae", lr_decay_steps=schedule.lr_anneal_steps,
                      export_config=models.export_config("dvae", model, loss=asdict(loss_cfg)))
    skips = SkipCounter(source=cfg.data)
    data = image_text_dataset(cfg.data, model_cfg.image_size, resampled=True, shuffle=1000, seed=cfg.seed + rank(),
                              skips=skips)
    stream = infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False))
    fixed = next(iter(batches(image_text_dataset(cfg.data, model_cfg.image_size), 16)))[0]

    def loss_fn(engine, batch, step):
        return dvae_loss(engine, batch[0], step, schedule)

    def on_step(t: Trainer):
        if t.is_main and t.preview_due():
            with t.previewing() as module:
                path = reconstruction_grid(module, fixed, t.out / "samples" / f"recon_{t.step:08d}.png")
            t.log_image("reconstructions", path)

    export = trainer.fit((b[:1] for b in stream), loss_fn, on_step=on_step, show=("tau", "codes_used", "recon_mse"),
                         skips=skips)
    if trainer.is_main:
        report(export, cfg, model_cfg)
    return export


@torch.no_grad()
def reconstruction_grid(model: DiscreteVAE, images: torch.Tensor, path):
    """Hard-code reconstructions (argmax codes, as the transformer sees them) next to the originals."""
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    recon = model.decode(model.encode(images.to(param.device, param.dtype))).float().cpu()
    model.train(was_training)
    pairs = torch.stack([images.float().cpu(), recon], dim=1).flatten(0, 1)  # original, recon, original, ...
    return save_grid(pairs, path, nrow=8)


@torch.no_grad()
def report(export, cfg: TrainConfig, model_cfg: DVAEConfig) -> dict:
    """Reconstruct held-in images with hard codes from the exported (EMA) weights."""
    model, _ = models.load(export, kind="dvae")
    images, texts, _ = next(iter(batches(image_text_dataset(cfg.data, model_cfg.image_size), 256)))
    codes = model.encode(images)
    recon = model.decode(codes)
    used, perplexity = codebook_usage(codes, model_cfg.num_tokens)
    stats = {"recon_mse": torch.mean((recon - images) ** 2).item(), "psnr": psnr(recon, images).mean().item(),
             "images": len(images), "codes_used": int(codes.unique().numel()), "codebook_usage": used,
             "perplexity": perplexity}
    if all(synthetic.is_caption(t) for t in texts):  # shapes world: does the reconstruction keep the caption true?
        stats["recon_caption_accuracy"] = sum(synthetic.check_batch(recon, list(texts))) / len(texts)
    save_json(export.parent / "reconstruction.json", stats)
    path = reconstruction_grid(model, images[:32], export.parent / "reconstructions.png")
    print(f"dvae (hard codes, EMA weights): {stats}; original | reconstruction pairs -> {path}")
    return stats


if __name__ == "__main__":
    run_cli(main)
