#!/usr/bin/env python
"""Sampling throughput with the KV cache (and, for comparison, without it): images/s and s/image.

  python -m bench.bench_sample --preset tiny --batch_size 64
Prints one JSON object (with the device) and writes it to --out if given.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

from bench.common import emit
from dalle_ar.config import DalleConfig, add_config_args, resolve
from dalle_ar.model import DalleTransformer
from dalle_ar.report import device_name
from dalle_ar.sampling import generate_codes, sample_token


@torch.no_grad()
def generate_uncached(model, text, generator):
    """Reference: re-run the full prefix for every token (what a cache saves)."""
    cfg = model.config
    codes = torch.zeros(text.shape[0], cfg.image_seq_len, dtype=torch.long, device=text.device)
    for i in range(cfg.image_seq_len):
        _, logits = model(text, codes[:, : i + 1])
        codes[:, i] = sample_token(logits[:, i], 1.0, 0, 0.0, generator)
    return codes


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_uncached", action="store_true", help="skip the uncached reference")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    add_config_args(p, DalleConfig)
    args = p.parse_args(argv)
    cfg = resolve(args, DalleConfig)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = DalleTransformer(cfg).to(args.device, dtype).eval()
    text = torch.randint(0, cfg.num_text_tokens, (args.batch_size, cfg.text_len), device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        fn()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        sync()
        return (time.perf_counter() - start) / args.repeats

    cached = timed(lambda: generate_codes(model, text, generator=gen))
    result = {"bench": "sample", "device": device_name(args.device), "torch": torch.__version__,
              "batch_size": args.batch_size, "image_seq_len": cfg.image_seq_len, "dtype": str(dtype),
              "cached_seconds_per_batch": round(cached, 4), "cached_images_per_s": round(args.batch_size / cached, 2),
              "model": asdict(cfg)}
    if not args.no_uncached:
        uncached = timed(lambda: generate_uncached(model, text, gen))
        result.update(uncached_seconds_per_batch=round(uncached, 4), cache_speedup=round(uncached / cached, 2))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
