#!/usr/bin/env python
"""Train a small open_clip model contrastively on image shards (for reranking and metrics).

  python train/train_clip.py --data data/shapes --out runs/clip --steps 1000 [--hard_negatives 2]
The export directory (<out>/export) is also an open_clip `local-dir:` model. --hard_negatives K adds, for every
shapes-world caption in a batch, K captions wrong in one attribute (colour, shape, size, position or relation) as
extra negatives for every image: a CLIP that must rank N candidates of one caption learns the differences that matter.
--hard_negative_images K is the image side of the same idea, for shards of `make_shards.py synthetic`: each training
scene (found from its key and the world its stats.json names) is rendered K more times, each with one attribute
changed (a different one each time), and each render competes with the right image for that caption, as the
candidates of one caption do when the CLIP reranks them. A sample that is not such a scene is counted (note
`no_scene`) and trains without them. --morph_negative_images K adds K renders of each scene in which one shape is
drawn part of the way toward another kind (`synthetic.morph_images`: a rounded square, a squashed circle), the
in-between shapes a generator draws, so the CLIP learns to rank them below the shape its caption names.
Every --sample_every steps and at the end: top-1 retrieval (image->text, text->image) on a fixed batch of 32 (held-out
scenes in the shapes world, else the data's first samples), logged (eval/retrieval_i2t, eval/retrieval_t2i) and on the
progress bar, with <out>/samples/retrieval_XXXXXXXX.png: 8 of its images, each with the caption CLIP picks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms.functional import to_tensor

from dalle_ar import models
from dalle_ar.cli import parse, run_cli
from dalle_ar.clip import (CachedTokenizer, build_clip, clip_tokenizer, contrastive_loss, export_files,
                           normalize_images, overlong, retrieval)
from dalle_ar.config import ClipConfig, DataError, TrainConfig
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SkipCounter, image_to_tensor
from dalle_ar.data.read import batches, image_text_dataset, infinite, shard_urls
from dalle_ar.engine import Trainer, rank
from dalle_ar.report import save_grid


def extra_args(p):
    p.add_argument("--hard_negatives", type=int, default=0,
                   help="one-attribute-wrong captions per shapes-world caption, added as negatives (default: 0, off)")
    p.add_argument("--hard_negative_images", type=int, default=0,
                   help="shapes-world shards: renders of each training scene with one attribute changed, added as "
                        "negative images for its caption (default: 0, off)")
    p.add_argument("--morph_negative_images", type=int, default=0,
                   help="shapes-world shards: renders of each training scene with one shape drawn part of the way to "
                        "another kind (a rounded square), added as negative images for its caption (default: 0, off)")


RETRIEVAL_BATCH, GRID_IMAGES = 32, 8
FIRST_BATCHES = 4  # --hard/morph_negative_images: batches in which at least one sample must be a scene of the world


def shapes_world(data: str, flag: str = "--hard_negative_images") -> dict:
    """make_example's arguments for the shards of `data`, from the stats.json that make_shards.py synthetic writes
    beside them (`flag`, --hard_negative_images or --morph_negative_images, re-renders each training scene from its
    key)."""
    stats_path = Path(shard_urls(data)[0]).parent / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
    if stats.get("source") != "synthetic":
        raise DataError(f"{flag} renders the shapes world's scenes, but {data} has no stats.json of "
                        f"`make_shards.py synthetic` ({stats_path}); make the shards with it, or drop the flag")
    return {"seed": stats["seed"], "image_size": stats["image_size"], "max_shapes": stats.get("max_shapes", 2),
            "p_two": stats.get("p_two", 0.5)}


def retrieval_batch(data: str, size: int) -> tuple[torch.Tensor, list[str]]:
    """The fixed retrieval batch: held-out scenes when the data is the shapes world, else its first samples."""
    images, texts, _ = next(iter(batches(image_text_dataset(data, size), RETRIEVAL_BATCH)))
    if all(synthetic.is_caption(t) for t in texts):
        held = synthetic.heldout(RETRIEVAL_BATCH, size)
        return torch.stack([to_tensor(image) for image, _ in held]), [c for _, c in held]
    return images, list(texts)


def main(argv=None):
    args, (clip_cfg, cfg) = parse(__doc__, ClipConfig, TrainConfig, extra=extra_args, argv=argv)
    flag = "--hard_negative_images" if args.hard_negative_images else "--morph_negative_images"
    renders = args.hard_negative_images or args.morph_negative_images
    world = shapes_world(cfg.data, flag) if renders else None  # before the engine: a wrong --data fails fast
    torch.manual_seed(cfg.seed)  # reproducible initialisation
    model = build_clip(clip_cfg)
    tokenizer = CachedTokenizer(clip_tokenizer(clip_cfg))  # the stream's captions repeat: each is encoded once
    trainer = Trainer(model, cfg, name="clip", export_config=models.export_config("clip", clip_cfg),
                      extra_files=export_files(clip_cfg, Path(cfg.out) / "open_clip"))
    skips = SkipCounter(source=cfg.data)
    data = image_text_dataset(cfg.data, clip_cfg.image_size, resampled=True, shuffle=2000, seed=cfg.seed + rank(),
                              skips=skips)
    rng = np.random.default_rng([cfg.seed, rank()])  # hard negatives, drawn in stream order (a resume replays it)

    def wrong_images(texts, keys) -> torch.Tensor | None:
        """(M, 3, S, S) renders of the batch's scenes, each with one attribute changed or one shape morphed; samples
        without a scene counted."""
        per = [synthetic.wrong_images(k, t, args.hard_negative_images, rng, **world)
               + synthetic.morph_images(k, t, args.morph_negative_images, rng, **world) for k, t in zip(keys, texts)]
        missing = sum(not r for r in per)
        if missing:
            skips.note("no_scene", missing)
        renders = [image_to_tensor(im, clip_cfg.image_size) for r in per for im in r]  # as the loader sizes the shards
        return torch.stack(renders) if renders else None

    def stream():
        scenes = 0
        for n, (images, texts, keys) in enumerate(infinite(batches(data, cfg.batch_size, cfg.num_workers, partial=False))):
            wrong = [w for t in texts for w in synthetic.wrong_captions(t, args.hard_negatives, rng)]
            tokens = tokenizer(list(texts))
            long = len(overlong(tokenizer, texts, tokens))  # trained on a prefix: counted, as the transformer's tokenizer does
            if long:
                skips.note("long_caption", long)
            neg_images = wrong_images(texts, keys) if world else None
            scenes += 0 if neg_images is None else 1
            if world and n == FIRST_BATCHES - 1 and not scenes:  # not one scene: the flag would do nothing, silently
                raise DataError(f"{flag}: no sample of the first {FIRST_BATCHES} batches of {cfg.data} "
                                f"is an example of the shapes world its stats.json names ({world}; e.g. key {keys[0]!r}: "
                                f"{texts[0]!r}); remake the shards with `make_shards.py synthetic`, or drop the flag")
            yield images, tokens, tokenizer(wrong) if wrong else None, neg_images

    def loss_fn(engine, batch, step):
        images, tokens, negatives, neg_images = batch
        neg = None if neg_images is None else normalize_images(trainer.module, neg_images)
        return contrastive_loss(engine, normalize_images(trainer.module, images), tokens, negatives, neg)

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

    return trainer.fit(stream(), loss_fn, on_step=on_step, skips=skips, show=("negative_wins", "negative_image_wins"))


if __name__ == "__main__":
    run_cli(main)
