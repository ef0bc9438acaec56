#!/usr/bin/env python
"""Transformer training throughput: tokens/s, achieved TFLOP/s and MFU for one model config.

  python -m bench.bench_train --preset tiny --batch_size 32            # CPU smoke
  python -m bench.bench_train --dim 1024 --depth 24 --heads 16 --batch_size 16 --text_len 256 --image_fmap_size 32 \\
      --num_image_tokens 8192 --peak_tflops 989                         # H100 bf16 dense peak
Prints one JSON object (with the device) and appends it to --out if given.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

from bench.common import emit
from dalle_ar.config import DalleConfig, add_config_args, resolve
from dalle_ar.report import device_name
from dalle_ar.model import DalleTransformer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: not reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file to write the result to")
    add_config_args(p, DalleConfig)
    args = p.parse_args(argv)
    cfg = resolve(args, DalleConfig)
    torch.manual_seed(0)
    model = DalleTransformer(cfg).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    step = torch.compile(model.loss) if args.compile else model.loss
    text = torch.randint(0, cfg.num_text_tokens, (args.batch_size, cfg.text_len), device=args.device)
    codes = torch.randint(0, cfg.num_image_tokens, (args.batch_size, cfg.image_seq_len), device=args.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda"))

    def one_step():
        with amp:
            loss, _ = step(text, codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        one_step()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        one_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch_size * cfg.seq_len
    tflops = model.flops_per_token() * tokens / seconds / 1e12
    result = {"bench": "train", "device": device_name(args.device), "torch": torch.__version__,
              "params_non_embedding": model.num_params(), "batch_size": args.batch_size, "seq_len": cfg.seq_len,
              "compile": args.compile, "seconds_per_step": round(seconds, 5), "tokens_per_s": round(tokens / seconds, 1),
              "achieved_tflops": round(tflops, 4), "mfu": round(tflops / args.peak_tflops, 4) if args.peak_tflops else None,
              "model": asdict(cfg)}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
