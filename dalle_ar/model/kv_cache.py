"""A static, preallocated key/value cache: one buffer per layer sized for the whole sequence, so
decoding never reallocates (no torch.cat growth) and every step has the same shapes.

Two ways in: `update` appends a chunk at `length` (prefill, primed image rows: the chunked path), and
`write` puts one token at a slot given as a device tensor (the decode step: no Python int per step, so
torch.compile / CUDA graphs see one graph for all steps). `keys_for` gives the cached slots a query may
read under each mask: sparse masks allow a fixed set of raster distances, so their key set has a
fixed size however long the prefix is.

Each layer's keys and values are tensors of their own, not views of one (layers, ...) buffer: torch.compile
writes the decode step's slot into them in place, where through a view of one shared buffer Inductor copied every
layer's whole buffer out and back at every step (the step's cost growing with batch and sequence length).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32, text_slots: int = 0,
                 image_offsets: dict[str, torch.Tensor | None] | None = None):
        shape = (batch, heads, max_len, head_dim)
        self.k = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers))
        self.v = tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers))
        self.max_len = max_len
        self.length = 0  # positions filled by `update` (advanced by the model after all layers ran)
        # per mask kind: raster distances d >= 0 an image query may attend (None = every earlier slot)
        self.text_slots = text_slots
        self.image_offsets = {kind: None if d is None else d.to(device) for kind, d in (image_offsets or {}).items()}
        self.slots = torch.arange(max_len, device=device)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new (B, H, n, D) keys/values at the current position; return the filled prefix."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def write(self, layer: int, slot: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Put one token's (B, H, 1, D) keys/values at `slot` (0-dim long tensor), in place."""
        self.k[layer].index_copy_(2, slot.view(1), k)
        self.v[layer].index_copy_(2, slot.view(1), v)

    def keys_for(self, kind: str, slot: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(slots to gather or None for the whole buffer, boolean mask (1, K)) for one image query at `slot`:
        all text slots, plus the image slots at the mask's raster distances that exist (>= first image slot)."""
        offsets = self.image_offsets.get(kind)
        if offsets is None:
            return None, (self.slots <= slot)[None]
        image = slot - offsets
        text = self.slots[: self.text_slots]
        keys = torch.cat([text, image.clamp(min=0)])
        return keys, torch.cat([torch.ones_like(text, dtype=torch.bool), image >= self.text_slots])[None]

    def mark_static(self) -> "KVCache":
        """Tell torch.compile the buffers live at fixed addresses (CUDA graphs then update them in place)."""
        for t in (*self.k, *self.v, self.slots, *(d for d in self.image_offsets.values() if d is not None)):
            torch._dynamo.mark_static_address(t)
        return self
