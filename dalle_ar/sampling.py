"""Autoregressive image-token sampling with the static KV cache (DALL-E section 2.3 and 3).

One loop serves every mode:
- plain sampling: temperature, top-k (a token count), top-p (nucleus), seeded generator;
- classifier-free guidance (Ho & Salimans 2022; used for autoregressive text-to-image by Make-A-Scene
  and Parti): logits = uncond + cond_scale * (cond - uncond), where the unconditional rows see the
  all-pad caption the model was trained on with `null_cond_prob` (`DalleTransformer.null_text`). Both
  halves run as one batch of 2B rows with one cache, and take the same sampled token;
- priming / inpainting: a boolean `known_mask` over the grid; known tokens are teacher-forced, the rest
  sampled. A prefix known in every row (priming: the top rows) is run through the cache in one chunk.
  An autoregressive model sees only the tokens before a hole, so inpainting conditions on the region
  above and left of it (the paper's image-to-image completions are top-half primes).

The per-token loop has no host syncs (no .item(), no Python branching on tensor values) and no tensor
growth: the cache is preallocated, the step addresses its slot with a device tensor, and `compile=True`
wraps the step in torch.compile (CUDA graphs on CUDA: one captured graph replays every step).
"""

from __future__ import annotations

import weakref
from typing import Callable

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
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    # The exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p. Unlike
    # torch.multinomial it never validates on the host (gpt-fast's "multinomial_sample_one_no_sync").
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(-1)


def guide(logits: torch.Tensor, cond_scale: float) -> torch.Tensor:
    """(2B, ...) logits for [cond rows; uncond rows] -> guided (B, ...) in fp32."""
    cond, uncond = logits.float().chunk(2)
    return uncond + cond_scale * (cond - uncond)


# -- which grid cells are known (True) and which are generated -------------------------------------
def prime_mask(side: int, rows: int) -> torch.Tensor:
    """(side, side) known mask for priming: the top `rows` rows are given."""
    if not 0 <= rows <= side:
        raise ValueError(f"prime rows {rows} outside the {side}x{side} code grid; pass 0..{side}")
    known = torch.zeros(side, side, dtype=torch.bool)
    known[:rows] = True
    return known


def box_mask(side: int, box: tuple[float, float, float, float]) -> torch.Tensor:
    """(side, side) known mask that regenerates the box x0, y0, x1, y1 (end exclusive). Integers are grid
    cells; if any value is a float in [0, 1] with a fraction, all are fractions of the image side."""
    if len(box) != 4:
        raise ValueError(f"inpaint box {box}: needs 4 values x0,y0,x1,y1")
    if any(isinstance(v, float) and not float(v).is_integer() for v in box) or all(
            isinstance(v, float) and 0 <= v <= 1 for v in box):
        box = tuple(round(v * side) for v in box)
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
        raise ValueError(f"inpaint box {x0},{y0},{x1},{y1} is empty or outside the {side}x{side} code grid")
    known = torch.ones(side, side, dtype=torch.bool)
    known[y0:y1, x0:x1] = False
    return known


def border_mask(side: int, width: int) -> torch.Tensor:
    """(side, side) known mask that regenerates a border `width` cells wide (the centre is kept)."""
    if not 0 < 2 * width < side:
        raise ValueError(f"inpaint border {width} leaves nothing of the {side}x{side} code grid; pass 1..{(side - 1) // 2}")
    known = torch.zeros(side, side, dtype=torch.bool)
    known[width:side - width, width:side - width] = True
    return known


_COMPILED: "weakref.WeakKeyDictionary[DalleTransformer, object]" = weakref.WeakKeyDictionary()


def decode_step_fn(model: DalleTransformer, compile: bool):
    """The model's decode step, optionally torch.compile'd once per model (CUDA: CUDA graphs)."""
    if not compile:
        return model.decode_step
    if model not in _COMPILED:
        cuda = model.to_image_logits.weight.is_cuda
        _COMPILED[model] = torch.compile(model.decode_step, mode="reduce-overhead" if cuda else None, dynamic=False)
    return _COMPILED[model]


_CACHES: "weakref.WeakKeyDictionary[DalleTransformer, dict]" = weakref.WeakKeyDictionary()


def reusable_cache(model: DalleTransformer, batch: int):
    """One cache per (model, batch, dtype), reused by every compiled call: CUDA graphs are captured against
    fixed buffer addresses, so a fresh cache per call would re-record them. Stale entries are harmless:
    prefill and each step write a slot before any query may attend to it (the mask hides the rest)."""
    p = model.to_image_logits.weight
    pool = _CACHES.setdefault(model, {})
    key = (batch, p.dtype, p.device)
    if key not in pool:
        pool[key] = model.new_cache(batch)
        if p.is_cuda:
            pool[key].mark_static()
    pool[key].length = 0
    return pool[key]


@torch.no_grad()
def generate_codes(model: DalleTransformer, text: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 0.0, generator: torch.Generator | None = None, cond_scale: float = 1.0,
                   known_codes: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
                   compile: bool = False, return_logits: bool = False, forced: torch.Tensor | None = None,
                   callback: Callable[[int], None] | None = None):
    """text (B, L) -> image codes (B, h, w).

    cond_scale: classifier-free guidance; 1 is plain conditional sampling (no unconditional pass).
    known_codes (B, N) or (B, h, w) with known_mask (h, w), (N,) or (B, ...): teacher-force those cells.
    forced (B, N): teacher-force every token through the per-token decode step (checks the cache).
    return_logits: also return the (guided) logits each token was drawn from, (B, N, Vi) fp32.
    callback(i): after each drawn token, with the number of image positions filled per row (for progress bars)."""
    model.eval()
    cfg = model.config
    B, N, device = text.shape[0], cfg.image_seq_len, text.device
    chunk_prefix = forced is None
    if forced is not None:
        known_codes, known_mask = forced, torch.ones(N, dtype=torch.bool)
    if known_codes is not None:
        known_codes = known_codes.reshape(B, N).to(device)
        known_mask = known_mask.to(device).reshape(-1, N).expand(B, N)
    guided = cond_scale != 1.0
    both = (lambda x: x.repeat(2, *([1] * (x.dim() - 1)))) if guided else (lambda x: x)
    rows = torch.cat([text, model.null_text(B, device)]) if guided else text

    cache = reusable_cache(model, rows.shape[0]) if compile else model.new_cache(rows.shape[0])
    step = decode_step_fn(model, compile)
    codes = torch.empty(B, N, dtype=torch.long, device=device)
    logits = model.prefill(rows, cache)
    all_logits = []
    start = 0
    if known_codes is not None and chunk_prefix:
        # leading cells known in every row (priming): one chunk through the cache instead of a loop
        start = min(int(known_mask.all(0).long().cumprod(0).sum()), N - 1)  # one sync, before the loop
        if start:
            codes[:, :start] = known_codes[:, :start]
            if return_logits:
                all_logits.append((guide(logits, cond_scale) if guided else logits.float())[:, None])
            chunk = model.prefill_image(both(codes[:, :start]), cache)
            if return_logits:
                all_logits.append((guide(chunk, cond_scale) if guided else chunk.float())[:, :-1])
            logits = chunk[:, -1]
    positions = torch.arange(N, device=device)
    for i in range(start, N):
        step_logits = guide(logits, cond_scale) if guided else logits
        if return_logits:
            all_logits.append(step_logits.float().clone()[:, None])  # clone: CUDA graphs reuse output memory
        token = sample_token(step_logits, temperature, top_k, top_p, generator)
        if known_codes is not None:
            token = torch.where(known_mask[:, i], known_codes[:, i], token)
        codes[:, i] = token
        if callback is not None:
            callback(i + 1)
        if i + 1 < N:
            if compile and device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(both(token), positions[i], cache)
    codes = codes.view(B, cfg.image_fmap_size, cfg.image_fmap_size)
    return (codes, torch.cat(all_logits, 1)) if return_logits else codes


@torch.no_grad()
def log_likelihood(model: DalleTransformer, text: torch.Tensor, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(B,) log p(codes | text) under the model: the sum of image-token log-probabilities, teacher-forced
    in batches (the transformer's own ranking, an alternative to CLIP)."""
    model.eval()
    codes = codes.flatten(1).to(text.device)
    out = []
    for t, c in zip(text.split(batch_size), codes.split(batch_size)):
        _, logits = model(t, c)
        out.append(F.log_softmax(logits.float(), -1).gather(-1, c[..., None]).squeeze(-1).sum(-1))
    return torch.cat(out)
