#!/usr/bin/env python
"""fp16 gradient fidelity: one global loss scale versus per-resblock gradient scaling (paper appendix D).

  python -m bench.fp16_grad_scaling --out bench/results/fp16_grad_scaling_cpu.json

For one batch, the block-parameter gradients of an fp16 copy of the model are compared with the fp32
model's: relative L2 error (mean and worst over block parameters) and the fraction of entries that
underflowed to zero, at a sweep of global loss scales S, with and without per-branch scales. It also
finds, for each residual branch, the largest power-of-two gradient scale at which that branch's
gradients stay finite: the spread between branches is what one global scale cannot serve. This measures
numerics, not speed; the speed cost is the `fp16_resblock` variant of bench/train_throughput.py.
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.common import emit


def block_grads(model, batch, loss_scale: float) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    loss, _ = model.loss(*batch)
    (loss * loss_scale).backward()
    return {n: p.grad.float() / loss_scale for n, p in model.named_parameters() if n.startswith("blocks")}


def compare(ref: dict, got: dict) -> dict:
    errs = [((got[n] - g).norm() / g.norm()).item() for n, g in ref.items()]
    nonzero = sum(int((g != 0).sum()) for g in ref.values())
    under = sum(int(((got[n] == 0) & (g != 0)).sum()) for n, g in ref.items())
    finite = all(torch.isfinite(g).all() for g in got.values())
    return {"rel_error_mean": round(sum(errs) / len(errs), 5), "rel_error_max": round(max(errs), 5),
            "underflow_fraction": round(under / nonzero, 6), "finite": bool(finite)}


def main(argv=None) -> dict:
    from dalle_ar.config import DalleConfig
    from dalle_ar.model import DalleTransformer
    from dalle_ar.model.parallelize import apply_resblock_grad_scaling
    from dalle_ar.report import device_name

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--branch_scale_log2", type=int, default=12, help="per-resblock runs: every branch at 2**this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cfg = DalleConfig(text_vocab_size=256, text_len=16, num_image_tokens=512, image_fmap_size=8, dim=args.dim,
                      depth=args.depth, heads=4, attention="sparse")
    torch.manual_seed(0)
    ref = DalleTransformer(cfg).to(args.device)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, cfg.num_text_tokens, (args.batch_size, cfg.text_len), generator=g).to(args.device),
             torch.randint(0, cfg.num_image_tokens, (args.batch_size, cfg.image_seq_len), generator=g).to(args.device))
    want = block_grads(ref, batch, 1.0)

    plain = copy.deepcopy(ref).half()
    scaled = copy.deepcopy(ref)
    scaler = apply_resblock_grad_scaling(scaled)
    scaled.half()
    scaler.to(args.device)
    sweep = []
    for k in (8, 4, 0, -4, -8, -12, -16):
        S = 2.0 ** k
        scaler.scales.fill_(2.0 ** args.branch_scale_log2)
        scaler.set_loss_scale(S)
        sweep.append({"loss_scale_log2": k, "global": compare(want, block_grads(plain, batch, S)),
                      "resblock": compare(want, block_grads(scaled, batch, S))})
        scaler.overflow.zero_()

    # each branch's headroom: the largest 2**k at which its own gradients stay finite
    headroom = [None] * len(scaler.scales)
    scaler.set_loss_scale(1.0)
    for k in range(0, 48):
        scaler.scales.fill_(2.0 ** k)
        block_grads(scaled, batch, 1.0)
        flags = scaler.overflow.tolist()
        scaler.overflow.zero_()
        for i, bad in enumerate(flags):
            if not bad and (headroom[i] is None or headroom[i] == k - 1):
                headroom[i] = k
        if all(flags):
            break
    global_max = None
    for k in range(0, 48):
        grads = block_grads(plain, batch, 2.0 ** k)
        if not all(torch.isfinite(g).all() for g in grads.values()):
            break
        global_max = k
    result = {"bench": "fp16_grad_scaling", "device": device_name(args.device),
              "model": {"depth": cfg.depth, "dim": cfg.dim, "attention": cfg.attention, "seq_len": cfg.seq_len,
                        "batch_size": args.batch_size},
              "branch_scale_log2": args.branch_scale_log2, "sweep": sweep,
              "branch_headroom_log2": headroom,
              "branch_headroom_log2_min_max": [min(headroom), max(headroom)],
              "global_headroom_log2": global_max}
    return emit(result, args.out)


if __name__ == "__main__":
    main()
