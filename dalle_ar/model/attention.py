"""Self-attention with DALL-E's sparse masks (appendix B.1, figure 11), a KV cache and rotary embeddings.

Slots are indexed as in transformer.py: slots 0 .. text_len hold [BOS, t_0 .. t_{L-1}] ("text keys"),
slot text_slots + m holds image token m (text_slots = text_len + 1, `DalleConfig.text_slots`; raster
order over the w x w grid). A query at slot q may
attend a key at slot k when k <= q (causal) and either k is a text key or, for two image slots at raster
distance d = q - k >= 0:

    full    every earlier image token
    row     d <= w: the previous w + 1 tokens in raster order, itself included ("each image token attends
            to the previous 5 image tokens in raster order" on a 4x4 grid: the current row up to the
            query and the previous row from the query's column on)
    column  d % w == 0: the same column, causal (figure 11(b); the flex path runs it as 11(c), below).
    conv    a causal 11x11 kernel *with wraparound*, like the row mask: d in [r*w - 5, r*w + 5] for some
            r in 0 .. 5 (r = 0: the 5 tokens before the query and itself). Offsets are taken in raster
            order, so near the left/right edge the window continues on the neighbouring row.

Every rule depends only on d, so it does not matter whether a slot is named by the token it holds or the
one it predicts; and since text keys are always visible, no query row is ever fully masked.

Two kernels compute the same thing. "sdpa" takes a dense boolean mask (the reference). "flex" takes a
FlexAttention BlockMask built from the same rule and skips fully masked 128x128 blocks (compiled on CUDA,
eager elsewhere); for column layers it attends over the image slots in column-major order, the paper's
"transposed image states", which makes those layers block-sparse too. Masks are built once per (mask,
layout, sequence length, device). Decoding with a KV cache always takes SDPA with the new queries' rows of
the dense mask: one query row is all a step needs; the per-token decode step (`decode_step`) reads only the
cached keys its mask allows (`KVCache.keys_for`).

`AttentionConfig` is all a layer needs to know (width, heads, the slot layout its masks are written for), so
other models (the unCLIP prior, the decoder's caption encoder) build these blocks without a DalleConfig.
No "stable softmax" (CogView's PB-relax): the SDPA and flex kernels compute softmax in fp32 after
subtracting the row max, so bf16 scores cannot overflow.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dalle_ar.model.kv_cache import KVCache

CONV_KERNEL = 11  # paper: "our model uses a mask corresponding to an 11 x 11 kernel"


def allowed(kind: str, q: torch.Tensor, k: torch.Tensor, text_slots: int, width: int) -> torch.Tensor:
    """The mask rule on (broadcast) slot indices: True where query slot q may attend key slot k.
    Tensor ops only, so the same function serves the dense mask and FlexAttention's mask_mod."""
    d = q - k
    if kind == "full":
        image = d >= 0
    elif kind == "row":
        image = d <= width
    elif kind == "column":
        image = d % width == 0
    elif kind == "conv":
        half = CONV_KERNEL // 2
        image = functools.reduce(operator.or_, ((d - r * width).abs() <= half for r in range(half + 1)))
    else:
        raise ValueError(f"unknown attention mask {kind!r}")
    return (d >= 0) & ((k < text_slots) | image)


@functools.lru_cache(maxsize=64)
def dense_mask(kind: str, seq_len: int, text_slots: int, width: int, device: torch.device) -> torch.Tensor:
    """(seq_len, seq_len) boolean mask, True = attend."""
    pos = torch.arange(seq_len, device=device)
    return allowed(kind, pos[:, None], pos[None, :], text_slots, width)


def flex_order(kind: str, seq_len: int, text_slots: int, width: int, device: torch.device) -> torch.Tensor | None:
    """The slot order flex attends in, or None for the natural one. Column attention lists the image slots
    column by column (the paper's transposed image states, figure 11(c)): in raster order a column touches
    every block, transposed it is block-diagonal and the kernel skips all but a band."""
    if kind != "column":
        return None
    m = torch.arange(seq_len - text_slots, device=device)
    image = text_slots + torch.argsort((m % width) * width + m // width)
    return torch.cat([torch.arange(text_slots, device=device), image])


@functools.lru_cache(maxsize=64)
def block_mask(kind: str, seq_len: int, text_slots: int, width: int, device: torch.device):
    """(FlexAttention BlockMask, slot order or None): the same rule as `dense_mask`, over reordered slots."""
    from torch.nn.attention.flex_attention import create_block_mask

    order = flex_order(kind, seq_len, text_slots, width, device)
    slot = (lambda i: i) if order is None else (lambda i: order[i])

    def mask_mod(b, h, q, k):
        return allowed(kind, slot(q), slot(k), text_slots, width)

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device), order


@functools.lru_cache(maxsize=4)
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention
    # Eager flex materialises the scores (and warns); it is the CPU test path, not a fast one.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def apply_rotary(x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoFormer, GPT-NeoX half-split layout) on (B, H, n, D) queries or keys at
    slots start .. start+n-1. Angles are computed in fp32. `start` may be a 0-dim device tensor (the decode
    step: static shapes, no host sync)."""
    n, dim = x.shape[-2], x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = (torch.arange(n, device=x.device) + start).float()[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@dataclass(frozen=True)
class AttentionConfig:
    """What one transformer block needs. The slot layout (seq_len, text_slots, width) only matters for the
    sparse masks and the KV cache; a plain causal ("full") block over any sequence can leave it at its defaults."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    backend: str = "sdpa"        # sdpa | flex (DalleConfig.attention_backend)
    rotary: bool = False
    sandwich_norm: bool = False
    seq_len: int = 0
    text_slots: int = 0
    width: int = 1               # image grid side

    @classmethod
    def of(cls, cfg) -> "AttentionConfig":
        """The blocks of a DalleTransformer (`cfg`: a DalleConfig)."""
        return cls(dim=cfg.dim, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
                   backend=cfg.attention_backend, rotary=cfg.rotary, sandwich_norm=cfg.sandwich_norm,
                   seq_len=cfg.seq_len, text_slots=cfg.text_slots, width=cfg.image_fmap_size)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention under one mask of the layer schedule (`kind`)."""

    def __init__(self, cfg: AttentionConfig, kind: str = "full"):
        super().__init__()
        assert cfg.dim % cfg.heads == 0, f"dim {cfg.dim} must be divisible by heads {cfg.heads}"
        self.kind, self.heads, self.dropout = kind, cfg.heads, cfg.dropout
        self.backend, self.rotary = cfg.backend, cfg.rotary
        self.seq_len, self.text_slots, self.width = cfg.seq_len, cfg.text_slots, cfg.width
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        start = cache.length if cache is not None else 0  # slot of the first new query
        if self.rotary:
            q, k = apply_rotary(q, start), apply_rotary(k, start)
        if cache is None and self.backend == "flex":
            out = self.flex(q, k, v)
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            out = self.sdpa(q, k, v, start)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def flex(self, q, k, v) -> torch.Tensor:
        bm, order = block_mask(self.kind, q.shape[2], self.text_slots, self.width, q.device)
        if order is None:
            return _flex_kernel(q.device.type)(q, k, v, block_mask=bm)
        out = _flex_kernel(q.device.type)(q[:, :, order], k[:, :, order], v[:, :, order], block_mask=bm)
        return torch.empty_like(out).index_copy_(2, order, out)  # back to slot order

    def sdpa(self, q, k, v, start: int) -> torch.Tensor:
        """Queries at slots start .. start+n-1 over keys at slots 0 .. end-1 (the dense reference path)."""
        n, end = q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if self.kind == "full" and start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if self.kind == "full" and n == 1:  # one new query sees the whole prefix
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        mask = dense_mask(self.kind, max(end, self.seq_len), self.text_slots, self.width, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[start:end, :end], dropout_p=dropout)

    def decode_step(self, x: torch.Tensor, slot: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """One query at `slot` (0-dim device tensor) under this layer's mask (the same rule as `sdpa`).
        Sparse masks allow a fixed set of raster distances, so only text keys + those image keys are gathered
        (row: w + 1 of them, conv: 61) instead of the whole prefix: the step reads what the mask needs."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.rotary:
            q, k = apply_rotary(q, slot), apply_rotary(k, slot)
        cache.write(layer, slot, k, v)
        keys, mask = cache.keys_for(self.kind, slot)
        if keys is None:  # full: the whole buffer, later slots masked out
            k, v = cache.k[layer], cache.v[layer]
        else:
            k, v = cache.k[layer].index_select(2, keys), cache.v[layer].index_select(2, keys)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))
