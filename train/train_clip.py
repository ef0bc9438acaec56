#!/usr/bin/env python
"""Train a small open_clip model contrastively on image shards (for reranking and metrics).

  python train/train_clip.py --data data/shapes --out runs/clip --steps 1000 [--hard_negatives 2]
The export directory (<out>/export) is also an open_clip `local-dir:` model. --hard_negatives K adds, for every
shapes-world caption in a batch, K captions wrong in one attribute (colour, shape, size, position or relation) as
extra negatives for every image: a CLIP that must rank N candidates of one caption learns the differences that matter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.clip import build_clip, clip_tokenizer, contrastive_loss, export_files, normalize_images
from dalle_ar.config import ClipConfig, TrainConfig
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank


def extra_args(p):
    p.add_argument("--hard_negatives", type=int, default=0,
                   help="one-attribute-wrong captions per shapes-world caption, added as negatives (default: 0, off)")


def main(argv=None):
    args, (clip_cfg, cfg) = parse(__doc__, ClipConfig, TrainConfig, extra=extra_args, argv=argv)
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = build_clip(clip_cfg)
    tokenizer = clip_tokenizer(clip_cfg)
    trainer = Trainer(model, cfg, name="clip", export_config=models.export_config("clip", clip_cfg),
                      extra_files=export_files(clip_cfg, Path(cfg.out) / "open_clip"))
    skips = SkipCounter(source=cfg.data)
    data = image_text_dataset(cfg.data, clip_cfg.image_size, resampled=True, shuffle=2000, seed=cfg.seed + rank(),
                              skips=skips)
    rng = np.random.default_rng([cfg.seed, rank()])  # hard negatives, drawn in stream order (a resume replays it)

    def stream():
        for images, texts, _ in infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False)):
            wrong = [w for t in texts for w in synthetic.wrong_captions(t, args.hard_negatives, rng)]
            yield images, tokenizer(list(texts)), tokenizer(wrong) if wrong else None

    def loss_fn(engine, batch, step):
        images, tokens, negatives = batch
        return contrastive_loss(engine, normalize_images(trainer.module, images), tokens, negatives)

    return trainer.fit(stream(), loss_fn, skips=skips, show=("negative_wins",))


if __name__ == "__main__":
    run_cli(main)
