#!/usr/bin/env python
"""dVAE encode / decode throughput (images/s) and what each optimisation buys.

  python -m bench.dvae_speed                       # GPU: paper dVAE at 256px, batch 64; CPU: tiny at 64px
  python -m bench.dvae_speed --preset paper --image_size 256 --batch_size 64 --variants fp32,bf16,bf16_cl,bf16_cl_compile
Variants: fp32 (NCHW baseline), cl (channels_last), bf16 (weights and activations), compile (torch.compile,
default mode), and onehot_decode (decode through the one-hot 1x1 conv instead of the column lookup). Each
is timed after warm-up; the JSON lists images/s per variant and the speed-up over fp32.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.common import emit
from dalle_ar.config import preset
from dalle_ar.report import device_name
from dvae import DiscreteVAE
from dvae.config import DVAEConfig


def build(args, variant: str) -> tuple[DiscreteVAE, torch.dtype, torch.memory_format]:
    torch.manual_seed(0)
    cfg = preset(DVAEConfig, args.preset, **({"image_size": args.image_size} if args.image_size else {}))
    dtype = torch.bfloat16 if "bf16" in variant else torch.float32
    fmt = torch.channels_last if "cl" in variant.split("_") else torch.contiguous_format
    model = DiscreteVAE(cfg).to(args.device, dtype).eval().to(memory_format=fmt)
    return model, dtype, fmt


def timed(fn, repeats: int, sync) -> float:
    for _ in range(2):  # warm-up (and compilation)
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def measure(args, variant: str, sync) -> dict:
    model, dtype, fmt = build(args, variant)
    cfg = model.config
    x = torch.rand(args.batch_size, 3, cfg.image_size, cfg.image_size, device=args.device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    codes = torch.randint(0, cfg.num_tokens, (args.batch_size, cfg.grid_size, cfg.grid_size), device=args.device)
    def onehot_decode(c):
        z = F.one_hot(c, cfg.num_tokens).permute(0, 3, 1, 2).to(dtype).contiguous(memory_format=fmt)
        return model.decoder(z)

    encode, decode = model.encode, onehot_decode if "onehot" in variant else model.decode
    if "compile" in variant:
        encode, decode = torch.compile(encode), torch.compile(decode)
    t_enc = timed(lambda: encode(x), args.repeats, sync)
    t_dec = timed(lambda: decode(codes), args.repeats, sync)
    return {"encode_images_per_s": round(args.batch_size / t_enc, 1), "decode_images_per_s": round(args.batch_size / t_dec, 1)}


def main(argv=None) -> dict:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper" if cuda else "tiny")
    p.add_argument("--image_size", type=int, default=0, help="override the preset's image size (0 = preset)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10 if cuda else 3)
    p.add_argument("--variants", default="fp32,cl,bf16,bf16_cl,bf16_cl_compile,onehot_decode" if cuda
                   else "fp32,cl,cl_compile,bf16,onehot_decode")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    results = {}
    for variant in args.variants.split(","):
        results[variant] = measure(args, variant, sync)
        print(variant, results[variant], flush=True)
    base = results.get("fp32")
    if base:
        for r in results.values():
            r["encode_speedup"] = round(r["encode_images_per_s"] / base["encode_images_per_s"], 2)
            r["decode_speedup"] = round(r["decode_images_per_s"] / base["decode_images_per_s"], 2)
    cfg = build(args, "fp32")[0].config
    return emit({"bench": "dvae_speed", "device": device_name(args.device), "torch": torch.__version__,
                 "preset": args.preset, "image_size": cfg.image_size, "grid": cfg.grid_size, "num_tokens": cfg.num_tokens,
                 "batch_size": args.batch_size, "variants": results}, args.out)


if __name__ == "__main__":
    main()
