"""The DALL-E transformer (section 2.2): one decoder-only stack over [text tokens | image tokens].

Sequence layout (L = text_len, N = image_seq_len):
    input   [BOS, t_0 .. t_{L-1}, i_0 .. i_{N-2}]     (L + N slots)
    target  [t_0 .. t_{L-1},      i_0 .. i_{N-1}]
Text and image tokens have separate embeddings and output heads; text slots get a learned position
embedding, image tokens a row + column embedding (with `rotary`, attention also rotates q and k by slot
index, on top of these). Each layer's attention mask (full, row, column, conv) follows
`DalleConfig.layer_attention`. Loss = w * text CE + (1 - w) * image CE, w = 1/8.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from dalle_ar.config import DalleConfig
from dalle_ar.model.attention import CausalSelfAttention, allowed
from dalle_ar.model.grad_scale import ResblockGradScaler
from dalle_ar.model.kv_cache import KVCache


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm residual block; `sandwich_norm` also normalises each branch's output (CogView, sec. 2.4),
    which keeps the residual stream's scale bounded in deep fp16/bf16 stacks."""

    def __init__(self, cfg: DalleConfig, kind: str = "full"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg, kind)
        self.ln_attn_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, int(cfg.mlp_ratio * cfg.dim), cfg.dropout)
        self.ln_mlp_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, scaler: ResblockGradScaler | None = None):
        if scaler is None:
            x = x + self.ln_attn_out(self.attn(self.ln_1(x), cache, layer))
            return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))
        # per-resblock gradient scaling: x is the fp32 residual stream; each branch is its own resblock
        dtype = self.ln_1.weight.dtype
        a = scaler.enter(x, 2 * layer, dtype)
        x = x + scaler.exit(self.ln_attn_out(self.attn(self.ln_1(a), cache, layer)), 2 * layer)
        m = scaler.enter(x, 2 * layer + 1, dtype)
        return x + scaler.exit(self.ln_mlp_out(self.mlp(self.ln_2(m))), 2 * layer + 1)

    def branch_params(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Parameters of the attention branch and of the MLP branch."""
        return ([*self.ln_1.parameters(), *self.attn.parameters(), *self.ln_attn_out.parameters()],
                [*self.ln_2.parameters(), *self.mlp.parameters(), *self.ln_mlp_out.parameters()])


class DalleTransformer(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.bos = nn.Parameter(torch.zeros(d))
        self.text_emb = nn.Embedding(cfg.num_text_tokens, d)
        self.text_pos = nn.Embedding(cfg.text_len + 1, d)  # slot 0 is BOS
        self.image_emb = nn.Embedding(cfg.num_image_tokens, d)
        self.image_row = nn.Embedding(cfg.image_fmap_size, d)
        self.image_col = nn.Embedding(cfg.image_fmap_size, d)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_attention)
        self.ln_f = nn.LayerNorm(d)
        self.to_text_logits = nn.Linear(d, cfg.num_text_tokens, bias=False)
        self.to_image_logits = nn.Linear(d, cfg.num_image_tokens, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.depth) ** 0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # -- embeddings ---------------------------------------------------------------------------
    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, L) -> (B, L + 1, d) for slots [BOS, t_0 .. t_{L-1}]."""
        bos = self.bos.expand(text.shape[0], 1, -1)
        x = torch.cat([bos, self.text_emb(text)], dim=1)
        return x + self.text_pos.weight[: x.shape[1]]

    def embed_image(self, codes: torch.Tensor, start: int = 0) -> torch.Tensor:
        """image codes (B, n) at image positions start .. start+n-1 -> (B, n, d)."""
        pos = torch.arange(start, start + codes.shape[1], device=codes.device)
        side = self.config.image_fmap_size
        return self.image_emb(codes) + self.image_row(pos // side) + self.image_col(pos % side)

    # -- trunk --------------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (activation checkpointing) while training."""
        self.grad_checkpointing = enable

    def enable_resblock_grad_scaling(self, **kwargs) -> ResblockGradScaler:
        """fp16 training: a gradient scale per residual branch (model/grad_scale.py, paper appendix D).
        Applies to training forwards (grad enabled, no cache); returns the scaler (its state is the
        trainer's to step, save and restore; `kwargs` go to ResblockGradScaler)."""
        scaler = ResblockGradScaler(2 * len(self.blocks), **kwargs)
        for i, block in enumerate(self.blocks):
            attn, mlp = block.branch_params()
            scaler.hook_branch_params(attn, 2 * i)
            scaler.hook_branch_params(mlp, 2 * i + 1)
        embeddings = (self.text_emb, self.text_pos, self.image_emb, self.image_row, self.image_col)
        scaler.hook_skip_params([self.bos, *(m.weight for m in embeddings)])
        self.grad_scaler = scaler
        return scaler

    def trunk(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        recompute = self.training and cache is None and getattr(self, "grad_checkpointing", False)
        scaler = getattr(self, "grad_scaler", None) if cache is None and torch.is_grad_enabled() else None
        if scaler is not None:
            x = x.float()  # the identity path in fp32 (so is its gradient)
        for i, block in enumerate(self.blocks):
            x = checkpoint(block, x, None, i, scaler, use_reentrant=False) if recompute else block(x, cache, i, scaler)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.ln_f(x.to(self.ln_f.weight.dtype))

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. text (B, L), codes (B, N) or (B, h, w) -> (text logits (B, L, Vt),
        image logits (B, N, Vi)); image logit j predicts image token j."""
        codes = codes.flatten(1)
        x = torch.cat([self.embed_text(text), self.embed_image(codes[:, :-1])], dim=1)
        h = self.trunk(x)
        L = self.config.text_len
        return self.to_text_logits(h[:, :L]), self.to_image_logits(h[:, L:])

    def drop_captions(self, text: torch.Tensor) -> torch.Tensor:
        """Caption dropout (`null_cond_prob`, in training mode only): each sample's whole caption becomes
        the all-pad caption (pad id at position i = text_vocab_size + i, as in text.py), so the model also
        learns p(image | no caption) for classifier-free guidance."""
        p = self.config.null_cond_prob
        if not (self.training and p > 0):
            return text
        pads = torch.arange(text.shape[1], device=text.device) + self.config.text_vocab_size
        drop = torch.rand(text.shape[0], 1, device=text.device) < p
        return torch.where(drop, pads, text)

    def loss(self, text: torch.Tensor, codes: torch.Tensor, forward=None) -> tuple[torch.Tensor, dict]:
        """Training loss with caption dropout. `forward` runs the model (the DeepSpeed engine in training;
        default: this module). Dropped captions are also the text targets (the model's own input)."""
        text = self.drop_captions(text)
        return self.loss_from_logits(*(forward or self)(text, codes), text, codes)

    def loss_from_logits(self, text_logits, image_logits, text, codes) -> tuple[torch.Tensor, dict]:
        """Cross-entropy in fp32 (bf16 logits lose the small probabilities), weighted text vs image."""
        codes = codes.flatten(1)
        text_loss = F.cross_entropy(text_logits.float().flatten(0, 1), text.flatten())
        image_loss = F.cross_entropy(image_logits.float().flatten(0, 1), codes.flatten())
        w = self.config.text_loss_weight
        loss = w * text_loss + (1 - w) * image_loss
        return loss, {"text_loss": text_loss.item(), "image_loss": image_loss.item()}

    # -- incremental decoding -----------------------------------------------------------------
    # prefill (and chunks of known image tokens, e.g. a primed image) runs the ordinary trunk, which
    # appends to the cache at `cache.length`. decode_step is the per-token hot loop: it addresses its
    # slot with a device tensor and reads a fixed number of cached keys, so every step has the same
    # shapes, no host sync and no growth -- torch.compile / CUDA graphs capture it once for all steps.
    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.to_image_logits.weight
        cfg = self.config
        return KVCache(cfg.depth, batch, cfg.heads, cfg.seq_len, cfg.dim // cfg.heads,
                       device=device or p.device, dtype=dtype or p.dtype, text_slots=cfg.text_len + 1,
                       image_offsets={kind: image_offsets(kind, cfg) for kind in set(cfg.layer_attention)})

    def prefill(self, text: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run [BOS, text] into the cache; returns image logits for image token 0 (B, Vi)."""
        h = self.trunk(self.embed_text(text), cache)
        return self.to_image_logits(h[:, -1])

    def prefill_image(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run known image tokens (B, n) -- the next n after what the cache holds -- in one chunk (priming);
        returns image logits (B, n, Vi), position j predicting the token after codes[:, j]."""
        start = cache.length - self.config.text_len - 1
        return self.to_image_logits(self.trunk(self.embed_image(codes, start=start), cache))

    def decode_step(self, code: torch.Tensor, index: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        """Feed image token `index` (B,); returns image logits for token index + 1 (B, Vi). `index` may
        be a 0-dim device tensor (no recompile or sync per step). Writes the token's keys/values at its
        slot; `cache.length` (the chunked path's cursor) is left alone."""
        cfg = self.config
        index = torch.as_tensor(index, device=code.device)
        slot = index + cfg.text_len + 1
        side = cfg.image_fmap_size
        x = self.image_emb(code[:, None]) + self.image_row(index // side) + self.image_col(index % side)
        for layer, block in enumerate(self.blocks):
            x = x + block.ln_attn_out(self._attend_step(block.attn, block.ln_1(x), slot, cache, layer))
            x = x + block.ln_mlp_out(block.mlp(block.ln_2(x)))
        return self.to_image_logits(self.ln_f(x)[:, -1])

    def _attend_step(self, attn, x: torch.Tensor, slot: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
        """One query at `slot` under `attn`'s mask (the same rule as CausalSelfAttention.sdpa). Sparse masks
        allow a fixed set of raster distances, so only text keys + those image keys are gathered (row:
        w + 1 of them, conv: 61) instead of the whole prefix: the step reads what the mask needs."""
        q, k, v = rearrange(attn.qkv(x), "b n (three h d) -> three b h n d", three=3, h=attn.heads)
        if attn.rotary:
            q, k = _rotary_at(q, slot), _rotary_at(k, slot)
        cache.write(layer, slot, k, v)
        keys, mask = cache.keys_for(attn.kind, slot)
        if keys is None:  # full: the whole buffer, later slots masked out
            k, v = cache.k[layer], cache.v[layer]
        else:
            k, v = cache.k[layer].index_select(2, keys), cache.v[layer].index_select(2, keys)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.proj(rearrange(out, "b h n d -> b n (h d)"))
    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.text_emb, self.image_emb, self.text_pos, self.image_row, self.image_col))
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N + attention, PaLM appendix B), for MFU accounting."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.depth * cfg.dim * cfg.seq_len


def _rotary_at(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """attention.apply_rotary for one position given as a 0-dim tensor (static shapes for the decode step)."""
    dim = x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = slot.float() * inv_freq
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def image_offsets(kind: str, cfg: DalleConfig) -> torch.Tensor | None:
    """The raster distances d = query - key >= 0 at which `kind` lets an image query see an image key
    (every rule in attention.allowed depends on d alone); None for "full" (every earlier slot)."""
    if kind == "full":
        return None
    d = torch.arange(cfg.image_seq_len)
    last = torch.tensor(cfg.seq_len)  # a (virtual) query slot far enough in that every distance is an image key
    return d[allowed(kind, last, last - d, cfg.text_len + 1, cfg.image_fmap_size)]
