"""Causal self-attention through `scaled_dot_product_attention`, with an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dalle_ar.model.kv_cache import KVCache


def causal_mask(n_new: int, n_total: int, device) -> torch.Tensor:
    """Boolean (n_new, n_total) mask for the last n_new queries of an n_total-long causal sequence."""
    q_pos = torch.arange(n_total - n_new, n_total, device=device)[:, None]
    return torch.arange(n_total, device=device)[None, :] <= q_pos


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"dim {dim} must be divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        n_new = x.shape[1]
        mask, is_causal = None, True
        if cache is not None:
            k, v = cache.update(layer, k, v)
            if n_new == 1:          # one new query sees the whole prefix: no mask needed
                is_causal = False
            elif k.shape[2] != n_new:  # a chunk after a prefix: causal within the chunk, full to the past
                mask, is_causal = causal_mask(n_new, k.shape[2], x.device), False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))
