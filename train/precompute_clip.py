#!/usr/bin/env python
"""Compute CLIP image and text embeddings of image shards once, for the unCLIP prior and decoder.

  python train/precompute_clip.py --clip runs/clip/export --data data/shapes --out data/shapes_clip
Each input shard NAME.tar becomes <out>/NAME.tar holding KEY.img_emb.npy, KEY.txt_emb.npy (unit-norm
float32) and KEY.txt, in the image shard's order. Finished shards are recorded in <out>/progress/, so
rerunning the same command after a crash computes only the shards not yet done; <out>/meta.json names
the CLIP (path and sha256 of its weights), the image shards and the embedding width (both trainers read it).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dalle_ar.clip import ClipScorer
from dalle_ar.cli import run_cli
from dalle_ar.config import save_json
from dalle_ar.data.embeddings import META, EmbeddingShards, clip_fingerprint, source
from dalle_ar.data.read import shard_urls


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="CLIP export directory or ARCH:/path/weights (dalle_ar.clip.load_clip)")
    p.add_argument("--data", required=True, help="image shard directory, glob or brace pattern")
    p.add_argument("--out", required=True, help="output directory for embedding shards")
    p.add_argument("--batch_size", type=int, default=256, help="(default: 256)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader processes reading whole shards; 0 reads in this process (default: min(8, CPU count))")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: cuda if available, else cpu)")
    args = p.parse_args(argv)

    urls = shard_urls(args.data)
    scorer = ClipScorer.load(args.clip, args.device)
    pre = scorer.model.visual.preprocess_cfg
    size = pre["size"] if isinstance(pre["size"], int) else pre["size"][0]
    device = torch.device(args.device)
    embed_dim = None

    fingerprint = clip_fingerprint(args.clip)
    with EmbeddingShards(args.out, urls, args.clip, fingerprint) as out:
        def embed(url, images, captions, keys):
            nonlocal embed_dim
            zi = scorer.encode_images(images.float().div_(255))
            zt = scorer.encode_texts(captions)
            embed_dim = zi.shape[-1]
            out.write(url, keys, zi.cpu().numpy(), zt.cpu().numpy(), captions)

        totals = out.process(size, args.batch_size, args.num_workers, device, embed, "clip embeddings", "embedded")

    if embed_dim is None:  # nothing new computed: the width from a previous run's metadata
        embed_dim = json.loads((Path(args.out) / META).read_text())["embed_dim"] if (Path(args.out) / META).exists() \
            else scorer.encode_texts(["x"]).shape[-1]
    meta = {"num_samples": totals["num_samples"], "clip": source(args.clip), "clip_sha256": fingerprint,
            "embed_dim": int(embed_dim), "image_size": size, "skipped": totals["skipped"],
            "num_shards": totals["num_shards"], "images": source(args.data)}
    save_json(Path(args.out) / META, meta)
    print(json.dumps(meta))
    if scorer.num_truncated:
        print(f"long captions: {scorer.num_truncated} longer than the CLIP's {scorer.tokenizer.context_length} tokens, "
              f"embedded from their first tokens", flush=True)
    return Path(args.out)


if __name__ == "__main__":
    run_cli(main)
