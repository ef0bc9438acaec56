"""A static, preallocated key/value cache: one buffer per layer sized for the whole sequence, so
decoding never reallocates and every step reads a contiguous prefix."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (num_layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled (advanced by the model after all layers ran)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, n, D) keys/values at the current position; return the filled prefix."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
