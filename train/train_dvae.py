#!/usr/bin/env python
"""Train the gumbel-softmax dVAE on image shards (DALL-E stage 1) through the DeepSpeed engine.

  python train/train_dvae.py --data data/shapes --out runs/dvae --preset tiny --steps 2000
  deepspeed train/train_dvae.py --preset paper --data 'shards/{000000..000999}.tar' --out runs/dvae
Writes <out>/export (config.json + model.safetensors) and <out>/reconstructions.png.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from dalle_ar.config import DVAEConfig, DVAELossConfig, TrainConfig, parse, save_json, run_cli
from dalle_ar.data import synthetic
from dalle_ar.data.shards import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank
from dalle_ar.report import save_grid
from dvae import DiscreteVAE
from dvae.loss import dvae_loss


def main(argv=None):
    _, (model_cfg, loss_cfg, cfg) = parse(__doc__, DVAEConfig, DVAELossConfig, TrainConfig, argv=argv)
    anneal = loss_cfg.anneal_steps or cfg.steps
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = DiscreteVAE(model_cfg)
    trainer = Trainer(model, cfg, name="dvae", export_config={"kind": "dvae", "dvae": asdict(model_cfg),
                                                               "loss": asdict(loss_cfg)})
    data = image_text_dataset(cfg.data, model_cfg.image_size, resampled=True, shuffle=1000, seed=cfg.seed + rank())
    stream = infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False))

    def loss_fn(engine, batch, step):
        images = batch[0]
        return dvae_loss(engine, images, step, anneal_steps=anneal, beta=loss_cfg.kl_weight,
                         temp_start=loss_cfg.temperature_start, temp_end=loss_cfg.temperature_end,
                         entropy=loss_cfg.entropy_weight, entropy_cell=loss_cfg.entropy_cell_weight)

    export = trainer.fit((b[:1] for b in stream), loss_fn)
    if trainer.is_main:
        report(export, cfg, model_cfg)
    return export


@torch.no_grad()
def report(export, cfg: TrainConfig, model_cfg: DVAEConfig) -> float:
    """Reconstruct a few held-in images with hard codes (argmax, as the transformer will see them)."""
    from dalle_ar.checkpoint import load_pretrained

    model, _ = load_pretrained(export, lambda c: DiscreteVAE(DVAEConfig(**c["dvae"])))
    images, texts, _ = next(iter(batches(image_text_dataset(cfg.data, model_cfg.image_size), 256)))
    codes = model.encode(images)
    recon = model.decode(codes)
    stats = {"recon_mse": torch.mean((recon - images) ** 2).item(), "images": len(images),
             "codes_used": int(codes.unique().numel())}
    if all(synthetic.is_caption(t) for t in texts):  # shapes world: does the reconstruction keep the caption true?
        stats["recon_caption_accuracy"] = sum(synthetic.check_batch(recon, list(texts))) / len(texts)
    save_json(export.parent / "reconstruction.json", stats)
    save_grid(torch.cat([images[:16], recon[:16]]), export.parent / "reconstructions.png", nrow=16)
    print(f"dvae (hard codes): {stats}; top row input, bottom row reconstruction -> {export.parent / 'reconstructions.png'}")
    return stats



if __name__ == "__main__":
    run_cli(main)
