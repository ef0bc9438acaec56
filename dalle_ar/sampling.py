"""Autoregressive image-token sampling with a KV cache (temperature, top-k, top-p, seed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_ar.model.transformer import DalleTransformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask logits outside the top-k and/or the smallest set with cumulative probability >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_codes(model: DalleTransformer, text: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 0.0, generator: torch.Generator | None = None,
                   return_logits: bool = False, forced: torch.Tensor | None = None):
    """text (B, L) -> image codes (B, h, w). With `forced` codes (B, N), tokens are teacher-forced
    instead of sampled (used to check the cache against the full forward)."""
    model.eval()
    cfg = model.config
    B, N = text.shape[0], cfg.image_seq_len
    cache = model.new_cache(B)
    logits = model.prefill(text, cache)
    codes = torch.empty(B, N, dtype=torch.long, device=text.device)
    all_logits = []
    for i in range(N):
        if return_logits:
            all_logits.append(logits.float())
        codes[:, i] = forced[:, i] if forced is not None else sample_token(logits, temperature, top_k, top_p, generator)
        if i + 1 < N:
            logits = model.decode_step(codes[:, i], i, cache)
    codes = codes.view(B, cfg.image_fmap_size, cfg.image_fmap_size)
    return (codes, torch.stack(all_logits, 1)) if return_logits else codes
