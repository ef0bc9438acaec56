#!/usr/bin/env python
"""Transformer training throughput through the real engine (DeepSpeed `Trainer`): tokens/s, model TFLOP/s,
MFU and peak memory, with ablations of what each speed-up buys; and the largest model that trains on
this GPU with ZeRO-3 + CPU offload.

  python -m bench.train_throughput --preset base --batch_size 16 --out bench/results/train_throughput_h100.json
  python -m bench.train_throughput --preset tiny --variants sdpa --steps 3      # CPU smoke run
  python -m bench.train_throughput --largest --out bench/results/largest_zero3_offload_h100.json

FLOP convention (PaLM, appendix B): model FLOPs per token = 6N + 12*L*d*seq, N = non-embedding parameters,
L = layers, d = width, seq = 1280 (256 text + 1024 image). The attention term counts dense causal
attention even for sparse layers, so sparse masks show as speed, not as fewer FLOPs. MFU is reported
against the device's dense bf16 peak (`--peak_tflops`, default from the device name) and against the
bf16 matmul ceiling measured here (a large GEMM), which is what "percent of what this GPU can do" means.
`counted_tflop_per_step` is torch's FlopCounterMode over one real step, as a cross-check.

Variants (each in its own process, ZeRO-2, bf16 on CUDA):
  sdpa           sparse masks as dense boolean masks through SDPA (the reference kernel)
  flex           sparse masks as FlexAttention BlockMasks (skips masked blocks)
  flex_compile   flex + torch.compile of the model
  full_compile   dense causal attention (flash SDPA) + torch.compile: the no-sparsity baseline
  unfused_adamw  flex_compile with torch's for-each AdamW instead of the fused kernel
  fp16           flex_compile in fp16 with DeepSpeed's dynamic loss scale (instead of bf16)
  fp16_resblock  fp16 with per-resblock gradient scaling (paper appendix D): its cost over fp16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from bench.common import emit
from bench.profiling import guarded, profile_calls

VARIANTS = {  # the headline first: a run cut short by a time limit keeps what it measured (--out is rewritten per variant)
    "flex_compile": dict(attention_backend="flex", compile=True),
    "full_compile": dict(attention="full", attention_backend="sdpa", compile=True),
    "sdpa": dict(attention_backend="sdpa"),
    "flex": dict(attention_backend="flex"),
    "unfused_adamw": dict(attention_backend="flex", compile=True, fused_adamw=False),
    "fp16": dict(attention_backend="flex", compile=True, precision="fp16"),
    "fp16_resblock": dict(attention_backend="flex", compile=True, precision="fp16", resblock_grad_scaling=True),
}
# Dense bf16 tensor-core peaks (spec sheets, no sparsity), for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
# --largest: (dim, depth, heads) ladder, ~1.3B to ~12B, tried in order with ZeRO-3 + CPU offload.
LADDER = [(2048, 24, 16), (2560, 32, 20), (3072, 40, 24), (3584, 48, 28), (3968, 56, 62), (3968, 64, 62)]


def peak_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def matmul_ceiling_tflops(device: str, n: int = 8192, reps: int = 20) -> float | None:
    """Achieved bf16 GEMM TFLOP/s (n x n x n): the practical ceiling MFU is compared with."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return round(2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12, 1)


def run_variant(args, overrides: dict) -> dict:
    """Build the model and the DeepSpeed engine exactly as train/train_dalle.py does, time optimizer steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from dalle_ar.config import DalleConfig, TrainConfig, preset
    from dalle_ar.engine import Trainer
    from dalle_ar.model import DalleTransformer
    from dalle_ar.report import device_name

    model_keys = {f.name for f in DalleConfig.__dataclass_fields__.values()}
    model_over = {k: v for k, v in overrides.items() if k in model_keys}
    train_over = {k: v for k, v in overrides.items() if k not in model_keys}
    cfg = preset(DalleConfig, args.preset, **model_over)
    torch.manual_seed(0)
    model = DalleTransformer(cfg)
    with tempfile.TemporaryDirectory() as out:
        tcfg = TrainConfig(out=out, steps=args.warmup + args.steps, batch_size=args.batch_size, zero_stage=args.zero_stage,
                           wandb="disabled", progress=False, save_every=0, warmup_steps=1,
                           **{"precision": "bf16" if args.device.startswith("cuda") else "fp32", **train_over})
        trainer = Trainer(model, tcfg, name="bench", export_config={})
        engine, device = trainer.engine, trainer.device
        g = torch.Generator().manual_seed(0)
        text = torch.randint(0, cfg.num_text_tokens, (args.batch_size, cfg.text_len), generator=g).to(device)
        codes = torch.randint(0, cfg.num_image_tokens, (args.batch_size, cfg.image_seq_len), generator=g).to(device)

        def step():
            inputs, target = trainer.module.training_inputs(text, codes)
            loss, _ = trainer.module.loss_from_output(engine(*inputs), target)
            trainer.micro_step(loss)
            return loss

        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(args.warmup):  # compile, autotune, allocator warm-up
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        seconds = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
        counter = FlopCounterMode(display=False)
        with counter:
            step()
        counted = counter.get_total_flops()
        profile = guarded(lambda: profile_calls(step, args.profile_steps, device)) if args.profile_steps else None
    tokens = args.batch_size * cfg.seq_len
    model_tflops = model.flops_per_token() * tokens / seconds / 1e12
    return {"config": {**asdict(cfg), "preset": args.preset}, "overrides": overrides, "loss": round(float(loss), 4),
            "device": device_name(str(device)), "seconds_per_step": round(seconds, 5),
            "tokens_per_s": round(tokens / seconds, 1), "model_tflops": round(model_tflops, 3),
            "model_flop_per_token": model.flops_per_token(), "params_non_embedding": model.num_params(),
            "params_total": model.num_params(exclude_embeddings=False),
            "counted_tflop_per_step": round(counted / 1e12, 4), "peak_memory_gib": round(peak, 2) if peak else None,
            **({"profile": profile} if profile else {})}


def in_subprocess(args, name: str, overrides: dict, timeout: int) -> dict:
    """One variant per process: compiled graphs, allocator state and an OOM stay in that process."""
    cmd = [sys.executable, "-m", "bench.train_throughput", "--_child", json.dumps(overrides), "--preset", args.preset,
           "--batch_size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--zero_stage", str(args.zero_stage), "--device", args.device, "--profile_steps", str(args.profile_steps)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"variant": name, "error": " | ".join(tail)[-600:]}
    return {"variant": name, **json.loads(lines[-1])}


def largest(args) -> dict:
    """Walk up LADDER (or the --rungs of it) with ZeRO-3 + CPU offload + activation checkpointing, batch 1;
    report each rung. The optimizer state lives in host memory (~16 bytes per parameter with fp32 master
    weights and Adam moments), so host RAM bounds the ladder as much as GPU memory does."""
    rungs = []
    picked = [LADDER[int(i)] for i in args.rungs.split(",")] if args.rungs else LADDER
    for dim, depth, heads in picked:
        over = dict(dim=dim, depth=depth, heads=heads, zero_stage=3, offload="cpu", activation_checkpointing=True,
                    attention_backend="flex")
        sub = argparse.Namespace(**{**vars(args), "batch_size": 1, "steps": 2, "warmup": 1, "zero_stage": 3})
        r = in_subprocess(sub, f"d{dim}_L{depth}", over, args.timeout)
        rungs.append({k: r.get(k) for k in ("variant", "params_total", "seconds_per_step", "tokens_per_s",
                                            "model_tflops", "peak_memory_gib", "error")})
        print(json.dumps(rungs[-1]), file=sys.stderr, flush=True)
        ok = [r for r in rungs if not r.get("error")]
        result = {"bench": "largest_zero3_offload", "rungs": rungs, "complete": False,
                  "largest_params": max((r["params_total"] for r in ok), default=None)}
        emit(result, args.out, echo=False)  # a run cut short keeps what it measured
        if "error" in r:
            break
    return {**result, "complete": True}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--preset", default="base" if cuda else "tiny",
                   help="DalleConfig preset (default: base, ~450M at seq 1280, on CUDA; tiny on CPU)")
    p.add_argument("--batch_size", type=int, default=16, help="micro-batch (sequences per step)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--zero_stage", type=int, default=2)
    p.add_argument("--profile_steps", type=int, default=0,
                   help="also profile this many steps: device time by kind (gemm, attention, optimizer, ...), busy share, "
                        "launches per step (bench/profiling.py)")
    p.add_argument("--variants", default=",".join(VARIANTS) if cuda else "sdpa",
                   help=f"comma list of {', '.join(VARIANTS)} (default: all on CUDA; sdpa on CPU, where flex has "
                        f"no backward)")
    p.add_argument("--largest", action="store_true", help="find the largest model for ZeRO-3 + CPU offload instead")
    p.add_argument("--rungs", default=None, help=f"--largest: comma list of LADDER indices 0-{len(LADDER) - 1} "
                                                 f"(default: all, smallest first)")
    p.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by device name)")
    p.add_argument("--timeout", type=int, default=540, help="seconds per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the JSON result here (e.g. bench/results/NAME.json)")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:
        print(json.dumps(run_variant(args, json.loads(args._child))), flush=True)
        return {}

    from dalle_ar.report import device_name

    if args.largest:
        return emit({**largest(args), "device": device_name(args.device)}, args.out)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    peak = args.peak_tflops or peak_tflops(args.device)
    ceiling = matmul_ceiling_tflops(args.device)
    results = []
    for name in args.variants.split(","):
        r = in_subprocess(args, name, VARIANTS[name], args.timeout)
        if "model_tflops" in r:
            r["mfu_vs_peak"] = round(r["model_tflops"] / peak, 4) if peak else None
            r["mfu_vs_matmul_ceiling"] = round(r["model_tflops"] / ceiling, 4) if ceiling else None
        results.append(r)
        print(json.dumps({k: r.get(k) for k in ("variant", "tokens_per_s", "model_tflops", "mfu_vs_peak",
                                                "peak_memory_gib", "error")}), file=sys.stderr, flush=True)
        best = max((r for r in results if "model_tflops" in r), key=lambda r: r["model_tflops"], default=None)
        result = {"bench": "train_throughput", "device": device_name(args.device), "torch": torch.__version__,
                  "preset": args.preset, "batch_size": args.batch_size, "zero_stage": args.zero_stage,
                  "precision": "bf16 (fp16 where the variant says)" if args.device.startswith("cuda") else "fp32",
                  "flop_convention": "6N + 12*L*d*seq per token (N non-embedding params, dense attention)",
                  "peak_bf16_tflops": peak, "matmul_ceiling_tflops": ceiling,
                  "best_variant": best and best["variant"], "variants": results, "complete": False}
        emit(result, args.out, echo=False)  # a run cut short keeps what it measured
    return emit({**result, "complete": True}, args.out)


if __name__ == "__main__":
    main()
