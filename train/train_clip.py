#!/usr/bin/env python
"""Train a small open_clip model contrastively on image shards (for reranking and metrics).

  python train/train_clip.py --data data/shapes --out runs/clip --steps 1000 [--hard_negatives 2]
The export directory (<out>/export) is also an open_clip `local-dir:` model. --hard_negatives K adds, for every
shapes-world caption in a batch, K captions wrong in one attribute (colour, shape, size, position or relation) as
extra negatives for every image: a CLIP that must rank N candidates of one caption learns the differences that matter.
Every --sample_every steps and at the end: top-1 retrieval (image->text, text->image) on a fixed batch of 32 (held-out
scenes in the shapes world, else the data's first samples), logged (eval/retrieval_i2t, eval/retrieval_t2i) and on the
progress bar, with <out>/samples/retrieval_XXXXXXXX.png: 8 of its images, each with the caption CLIP picks for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.clip import (build_clip, clip_tokenizer, contrastive_loss, export_files, normalize_images, overlong,
                           retrieval)
from dalle_ar.config import ClipConfig, TrainConfig
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SkipCounter
from dalle_ar.data.read import batches, image_text_dataset, infinite
from dalle_ar.engine import Trainer, rank
from dalle_ar.report import save_grid


def extra_args(p):
    p.add_argument("--hard_negatives", type=int, default=0,
                   help="one-attribute-wrong captions per shapes-world caption, added as negatives (default: 0, off)")


RETRIEVAL_BATCH, GRID_IMAGES = 32, 8


def retrieval_batch(data: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """The fixed retrieval batch: held-out scenes when the data is the shapes world, else its first samples."""
    images, texts, _ = next(iter(batches(image_text_dataset(data, size), RETRIEVAL_BATCH)))
    if all(synthetic.is_caption(t) for t in texts):
        held = synthetic.heldout(RETRIEVAL_BATCH, size)
        return torch.stack([to_tensor(image) for image, _ in held]), [c for _, c in held]
    return images, list(texts)


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
            tokens = tokenizer(list(texts))
            long = len(overlong(tokenizer, texts, tokens))  # trained on a prefix: counted, as the transformer's tokenizer does
            if long:
                skips.note("long_caption", long)
            yield images, tokens, tokenizer(wrong) if wrong else None

    def loss_fn(engine, batch, step):
        images, tokens, negatives = batch
        return contrastive_loss(engine, normalize_images(trainer.module, images), tokens, negatives)

    fixed_images, fixed_texts = retrieval_batch(cfg.data, clip_cfg.image_size)

    def on_step(t: Trainer) -> None:
        if not (t.is_main and t.preview_due()):
            return
        with t.previewing() as module:
            r = retrieval(module, tokenizer, fixed_images, fixed_texts)
        t.log({"eval/retrieval_i2t": r["i2t"], "eval/retrieval_t2i": r["t2i"]})
        t.bar_metrics.update(i2t=f"{r['i2t']:.2f}", t2i=f"{r['t2i']:.2f}")
        labels = [("right: " if fixed_texts[j] == fixed_texts[i] else "wrong: ") + fixed_texts[j]
                  for i, j in enumerate(r["best_text"][:GRID_IMAGES])]
        path = save_grid(fixed_images[:GRID_IMAGES], t.out / "samples" / f"retrieval_{t.step:08d}.png", nrow=1,
                         row_labels=labels, label_width=420)
        t.log_image("retrieval", path)

    return trainer.fit(stream(), loss_fn, on_step=on_step, skips=skips, show=("negative_wins",))


if __name__ == "__main__":
    run_cli(main)
