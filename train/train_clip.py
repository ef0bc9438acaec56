#!/usr/bin/env python
"""Train a small open_clip model contrastively on image shards (for reranking and metrics).

  python train/train_clip.py --data data/shapes --out runs/clip --steps 1000
The export directory (<out>/export) is also an open_clip `local-dir:` model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.clip import build_clip, clip_tokenizer, contrastive_loss, export_files, normalize_images
from dalle_ar.config import ClipConfig, TrainConfig
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank


def main(argv=None):
    _, (clip_cfg, cfg) = parse(__doc__, ClipConfig, TrainConfig, argv=argv)
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = build_clip(clip_cfg)
    tokenizer = clip_tokenizer(clip_cfg)
    trainer = Trainer(model, cfg, name="clip", export_config=models.export_config("clip", clip_cfg),
                      extra_files=export_files(clip_cfg, Path(cfg.out) / "open_clip"))
    skips = SkipCounter(source=cfg.data)
    data = image_text_dataset(cfg.data, clip_cfg.image_size, resampled=True, shuffle=2000, seed=cfg.seed + rank(),
                              skips=skips)
    stream = ((images, tokenizer(list(texts))) for images, texts, _ in
              infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False)))

    def loss_fn(engine, batch, step):
        images, tokens = batch
        return contrastive_loss(engine, normalize_images(trainer.module, images), tokens)

    return trainer.fit(stream, loss_fn, skips=skips)


if __name__ == "__main__":
    run_cli(main)
