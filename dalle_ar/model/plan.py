"""Size a DALL-E transformer without allocating it: parameters, FLOPs and a per-GPU memory plan
(the command line is bench/memory_plan.py: `python -m bench.memory_plan --preset paper --world_size 64`).

The model is built on the meta device (shapes only). Memory follows the ZeRO paper (Rajbhandari et al.
2020) for bf16 mixed precision with AdamW: 2 bytes/param bf16 weights, 2 bytes/param bf16 gradients,
12 bytes/param optimizer state (fp32 master weights + 2 fp32 moments); ZeRO 1 shards the optimizer
state over the data-parallel ranks, ZeRO 2 also the gradients, ZeRO 3 also the weights. Activations
follow Korthikanti et al. 2022 (sec. 4.1) for bf16 without tensor/sequence parallelism: 34*s*b*d bytes
per layer, since the fused SDPA/flex kernels never store the s x s scores (their 5*a*s^2*b term is gone);
plus the logits (bf16 out of the heads, fp32 for the cross-entropy and its gradient).
"""

from __future__ import annotations

import torch

from dalle_ar.config import DalleConfig
from dalle_ar.model.attention import dense_mask
from dalle_ar.model.transformer import DalleTransformer


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 30, 3)


def build_on_meta(cfg: DalleConfig) -> DalleTransformer:
    with torch.device("meta"):
        return DalleTransformer(cfg)


def weight_memory(n_params: int, world_size: int) -> dict:
    """Bytes per GPU for bf16 weights + bf16 grads + fp32 AdamW state, for each ZeRO stage."""
    w, g, opt, ws = 2 * n_params, 2 * n_params, 12 * n_params, world_size
    stages = {0: (w, g, opt), 1: (w, g, opt / ws), 2: (w, g / ws, opt / ws), 3: (w / ws, g / ws, opt / ws)}
    return {f"zero_{z}": {"weights_gib": gib(a), "grads_gib": gib(b), "optimizer_gib": gib(c), "total_gib": gib(a + b + c)}
            for z, (a, b, c) in stages.items()}


def activation_memory(cfg: DalleConfig, batch_size: int) -> dict:
    """Bytes of activations kept for the backward pass of one micro-batch, with and without per-block
    activation checkpointing (which keeps each block's bf16 input and recomputes one block at a time)."""
    s, b, d, depth = cfg.seq_len, batch_size, cfg.dim, cfg.depth
    per_layer = 34 * s * b * d
    logits = b * (cfg.text_len * cfg.num_text_tokens + cfg.image_seq_len * cfg.num_image_tokens) * (2 + 4 + 4)
    block_input = 2 * s * b * d  # bf16 residual stream entering a block (and the embedding output)
    return {"per_layer_gib": gib(per_layer), "logits_gib": gib(logits),
            "without_checkpointing_gib": gib(depth * per_layer + block_input + logits),
            "with_checkpointing_gib": gib((depth + 1) * block_input + per_layer + logits)}


def attention_density(cfg: DalleConfig) -> dict:
    """Fraction of the causal (query, key) pairs each mask in the schedule keeps, over the whole sequence."""
    causal = cfg.seq_len * (cfg.seq_len + 1) / 2
    kinds = cfg.layer_attention
    return {kind: {"layers": kinds.count(kind),
                   "density": round(dense_mask(kind, cfg.seq_len, cfg.text_slots, cfg.image_fmap_size,
                                         torch.device("cpu")).sum().item() / causal, 3)}
            for kind in dict.fromkeys(kinds)}


def plan(cfg: DalleConfig, world_size: int = 8, batch_size: int = 1) -> dict:
    model = build_on_meta(cfg)
    total = model.num_params(exclude_embeddings=False)
    act = activation_memory(cfg, batch_size)
    memory = weight_memory(total, world_size)
    for stage in memory.values():
        stage["with_activations_gib"] = round(stage["total_gib"] + act["without_checkpointing_gib"], 3)
        stage["with_checkpointed_activations_gib"] = round(stage["total_gib"] + act["with_checkpointing_gib"], 3)
    return {
        "config": {"dim": cfg.dim, "depth": cfg.depth, "heads": cfg.heads, "seq_len": cfg.seq_len,
                   "attention": cfg.attention, "attention_backend": cfg.attention_backend},
        "params": {"total": total, "non_embedding": model.num_params()},
        # 6N + 12*L*d*s (dense attention, PaLM appendix B), the convention MFU is reported in; sparse
        # masks do fewer attention FLOPs in fact (see attention_density).
        "flops_per_token": model.flops_per_token(),
        "flops_per_sample": model.flops_per_token() * cfg.seq_len,
        "attention_density": attention_density(cfg),
        "memory": {"world_size": world_size, "micro_batch": batch_size, "precision": "bf16 + fp32 AdamW",
                   "activations": act, "per_gpu": memory},
    }
