#!/usr/bin/env python
"""Sampling speed of the DALL-E transformer: seconds per image and image tokens/s at several batch sizes,
eager vs torch.compile'd decode step, against the memory-bandwidth floor.

  python -m bench.sample_speed --preset base --device cuda --out bench/results/sample_speed_base_h100.json
  python -m bench.sample_speed --preset tiny --batch-sizes 1,8,64      # CPU smoke run

Decoding one token is memory-bound: each step reads the weights it uses plus the cached keys/values its
masks allow. floor per step = (decode weight bytes + KV bytes that step's masks read) / bandwidth, with
the bandwidth measured by a large device-to-device copy; summed over the image tokens, divided by the
batch. Random weights (speed does not depend on them). bf16 on CUDA, fp32 on CPU. One JSON object. Each
batch size's first call (torch.compile's compilation and CUDA-graph recording, when compiled) is timed apart
(`first_call_seconds`), so whether compiling pays off for a job of a given length can be read off.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

from bench.common import emit
from bench.profiling import Window, guarded
from dalle_ar.cli import add_config_args, resolve
from dalle_ar.config import DalleConfig
from dalle_ar.model import DalleTransformer
from dalle_ar.model.attention import dense_mask
from dalle_ar.report import device_name
from dalle_ar.sampling import generate_codes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(device: str, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a large copy (each byte read once and written once)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    sync(device)
    return 2 * x.numel() * 4 * repeats / (time.perf_counter() - start)


def decode_weight_bytes(model: DalleTransformer) -> int:
    """Weights one decode step reads: the blocks, the final norm and the image head (the embeddings are
    single-row lookups; the text embeddings and text head are not used)."""
    used = [model.blocks, model.ln_f, model.to_image_logits]
    return sum(p.numel() * p.element_size() for m in used for p in m.parameters())


def kv_bytes_per_step(model: DalleTransformer, batch: int, elem: int) -> torch.Tensor:
    """(N - 1,) KV-cache bytes the masks let step i read (image token i at slot text_slots + i)."""
    cfg = model.config
    slots = torch.arange(cfg.text_slots, cfg.seq_len)
    keys = sum(dense_mask(kind, cfg.seq_len, cfg.text_slots, cfg.image_fmap_size, torch.device("cpu"))[slots].sum(1)
               for kind in cfg.layer_attention)
    return keys.double() * 2 * batch * cfg.dim * elem  # k and v, all heads


def profile_tokens(model: DalleTransformer, text: torch.Tensor, compile: bool, tokens: int, device: str) -> dict:
    """One more image, with the profiler open for `tokens` decode steps from the middle of the grid (the
    sampler's per-token callback opens and closes it): what one token costs, by kind, and how many launches."""
    N = model.config.image_seq_len
    first = max(1, N // 2 - tokens // 2)
    tokens = min(tokens, N - 1 - first)
    window = Window(device)

    def callback(filled: int) -> None:
        if filled == first:
            window.start()
        elif filled == first + tokens:
            window.stop()

    generate_codes(model, text, generator=torch.Generator(device=device).manual_seed(1), compile=compile,
                   callback=callback)
    return window.summary(tokens)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", "--batch_sizes", dest="batch_sizes", default="1,8,64")
    p.add_argument("--variants", default=None, help="comma list of eager,compiled (default: both on CUDA, eager on CPU)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bandwidth-bytes", "--bandwidth_bytes", dest="bandwidth_bytes", type=int, default=None,
                   help="size of the bandwidth copy (default: 1 GiB on CUDA, 256 MiB on CPU)")
    p.add_argument("--profile-tokens", "--profile_tokens", dest="profile_tokens", type=int, default=0,
                   help="also profile this many decode steps mid-image for each batch size: device time by kind, busy "
                        "share, kernel launches and CUDA-graph replays per token (bench/profiling.py)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    add_config_args(p, DalleConfig)
    args = p.parse_args(argv)
    cfg = resolve(args, DalleConfig)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    variants = (args.variants or ("eager,compiled" if cuda else "eager")).split(",")
    torch.manual_seed(0)
    model = DalleTransformer(cfg).to(args.device, dtype).eval()
    elem = torch.finfo(dtype).bits // 8
    bandwidth = measure_bandwidth(args.device, args.bandwidth_bytes or (2**30 if cuda else 2**28))
    weights = decode_weight_bytes(model)
    N = cfg.image_seq_len

    results = {}

    def result(complete: bool) -> dict:
        return {"bench": "sample_speed", "device": device_name(args.device), "torch": torch.__version__,
                "preset": args.preset, "dtype": str(dtype).replace("torch.", ""), "image_tokens": N,
                "params": sum(p.numel() for p in model.parameters()), "decode_weight_bytes": weights,
                "bandwidth_GBps": round(bandwidth / 1e9, 1), "results": results,
                "targets": "H100, base: batch 1 <= 2x floor (~0.6 s/image); batch 8 <= 0.1 s/image",
                "model": asdict(cfg), "complete": complete}

    for variant in variants:
        results[variant] = {}
        for b in (int(x) for x in args.batch_sizes.split(",")):
            text = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_len), device=args.device)
            gen = torch.Generator(device=args.device).manual_seed(0)
            run = lambda: generate_codes(model, text, generator=gen, compile=variant == "compiled")  # noqa: E731
            start = time.perf_counter()
            run()  # warm-up (and compilation)
            sync(args.device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.repeats):
                run()
            sync(args.device)
            seconds = (time.perf_counter() - start) / args.repeats
            floor = float(((weights + kv_bytes_per_step(model, b, elem)) / bandwidth).sum())
            results[variant][str(b)] = {
                "seconds_per_batch": round(seconds, 4), "seconds_per_image": round(seconds / b, 5),
                "first_call_seconds": round(first, 3),  # with compilation (and CUDA-graph recording) when compiled
                "image_tokens_per_s": round(b * N / seconds, 1),
                "floor_seconds_per_image": round(floor / b, 5), "x_floor": round(seconds / floor, 2)}
            if args.profile_tokens:
                results[variant][str(b)]["profile_per_token"] = guarded(lambda: profile_tokens(
                    model, text, variant == "compiled", args.profile_tokens, args.device))
            emit(result(False), args.out, echo=False)  # a run cut short by a time limit keeps what it measured
    return emit(result(True), args.out)


if __name__ == "__main__":
    main()
