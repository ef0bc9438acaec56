"""The DALL-E transformer (section 2.2): one decoder-only stack over [text tokens | image tokens].

Sequence layout (L = text_len, N = image_seq_len):
    input   [BOS, t_0 .. t_{L-1}, i_0 .. i_{N-2}]     (L + N slots)
    target  [t_0 .. t_{L-1},      i_0 .. i_{N-1}]
Text and image tokens have separate embeddings and output heads; text slots get a learned position
embedding, image tokens a row + column embedding (with `rotary`, attention also rotates q and k by slot
index, on top of these). Each layer's attention mask (full, row, column, conv) follows
`DalleConfig.layer_attention`. Loss = w * text CE + (1 - w) * image CE, w = 1/8.

Single-device and training-agnostic: activation checkpointing and the fp16 per-resblock gradient scaler
are applied from outside (model/parallelize.py), the way torchtitan keeps parallelism out of its models.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ar.config import DalleConfig
from dalle_ar.model.attention import AttentionConfig, CausalSelfAttention, allowed
from dalle_ar.model.kv_cache import KVCache
from dalle_ar.text import null_caption


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
    which keeps the residual stream's scale bounded in deep fp16/bf16 stacks. Two residual branches
    ("resblocks"): ln_1 -> attn -> ln_attn_out and ln_2 -> mlp -> ln_mlp_out."""

    def __init__(self, cfg: AttentionConfig, kind: str = "full"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg, kind)
        self.ln_attn_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()
        self.ln_2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, int(cfg.mlp_ratio * cfg.dim), cfg.dropout)
        self.ln_mlp_out = nn.LayerNorm(cfg.dim) if cfg.sandwich_norm else nn.Identity()

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        x = x + self.ln_attn_out(self.attn(self.ln_1(x), cache, layer))
        return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))

    def decode_step(self, x, slot: torch.Tensor, cache: KVCache, layer: int):
        """`forward` for one image token at `slot` (a 0-dim device tensor): static shapes for the decode loop."""
        x = x + self.ln_attn_out(self.attn.decode_step(self.ln_1(x), slot, cache, layer))
        return x + self.ln_mlp_out(self.mlp(self.ln_2(x)))


class DalleTransformer(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.bos = nn.Parameter(torch.zeros(d))
        self.text_emb = nn.Embedding(cfg.num_text_tokens, d)
        self.text_pos = nn.Embedding(cfg.text_slots, d)  # slot 0 is BOS
        self.image_emb = nn.Embedding(cfg.num_image_tokens, d)
        self.image_row = nn.Embedding(cfg.image_fmap_size, d)
        self.image_col = nn.Embedding(cfg.image_fmap_size, d)
        self.blocks = nn.ModuleList(Block(AttentionConfig.of(cfg), kind) for kind in cfg.layer_attention)
        self.ln_f = nn.LayerNorm(d)
        self.to_text_logits = nn.Linear(d, cfg.num_text_tokens, bias=False)
        self.to_image_logits = nn.Linear(d, cfg.num_image_tokens, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / (2 * cfg.depth) ** 0.5)

    def muon_params(self) -> list[nn.Parameter]:
        """The hidden matrices (attention and MLP weights) for `--optimizer muon`; embeddings, heads, norms and
        biases train with AdamW."""
        return [p for p in self.blocks.parameters() if p.ndim >= 2]

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
    def trunk(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        # the residual stream may arrive in fp32 (per-resblock grad scaling keeps the identity path there)
        return self.ln_f(x.to(self.ln_f.weight.dtype))

    def forward(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. text (B, L), codes (B, N) or (B, h, w) -> (text logits (B, L, Vt),
        image logits (B, N, Vi)); image logit j predicts image token j."""
        codes = codes.flatten(1)
        x = torch.cat([self.embed_text(text), self.embed_image(codes[:, :-1])], dim=1)
        h = self.trunk(x)
        L = self.config.text_len
        return self.to_text_logits(h[:, :L]), self.to_image_logits(h[:, L:])

    def null_text(self, batch: int, device=None) -> torch.Tensor:
        """The all-pad caption (text.null_caption): the unconditional input caption dropout trains."""
        return null_caption(self.config.text_vocab_size, self.config.text_len, batch, device)

    def drop_captions(self, text: torch.Tensor) -> torch.Tensor:
        """Caption dropout (`null_cond_prob`, in training mode only): each sample's whole caption becomes
        the all-pad caption, so the model also learns p(image | no caption) for classifier-free guidance."""
        p = self.config.null_cond_prob
        if not (self.training and p > 0):
            return text
        drop = torch.rand(text.shape[0], 1, device=text.device) < p
        return torch.where(drop, self.null_text(1, text.device)[0], text)

    # -- training loss: inputs -> (anyone's) forward -> loss, so a training engine runs the forward itself
    def training_inputs(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[tuple, tuple]:
        """(forward args, loss targets) for a batch. Caption dropout happens here; dropped captions are
        also the text targets (the model's own input)."""
        text = self.drop_captions(text)
        return (text, codes), (text, codes)

    def loss_from_output(self, output, target) -> tuple[torch.Tensor, dict]:
        return self.loss_from_logits(*output, *target)

    def loss(self, text: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Training loss with caption dropout, this module running the forward."""
        args, target = self.training_inputs(text, codes)
        return self.loss_from_output(self(*args), target)

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
                       device=device or p.device, dtype=dtype or p.dtype, text_slots=cfg.text_slots,
                       image_offsets={kind: image_offsets(kind, cfg) for kind in set(cfg.layer_attention)})

    def prefill(self, text: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run [BOS, text] into the cache; returns image logits for image token 0 (B, Vi)."""
        h = self.trunk(self.embed_text(text), cache)
        return self.to_image_logits(h[:, -1])

    def prefill_image(self, codes: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run known image tokens (B, n) -- the next n after what the cache holds -- in one chunk (priming);
        returns image logits (B, n, Vi), position j predicting the token after codes[:, j]."""
        start = cache.length - self.config.text_slots
        return self.to_image_logits(self.trunk(self.embed_image(codes, start=start), cache))

    def decode_step(self, code: torch.Tensor, index: torch.Tensor | int, cache: KVCache) -> torch.Tensor:
        """Feed image token `index` (B,); returns image logits for token index + 1 (B, Vi). `index` may
        be a 0-dim device tensor (no recompile or sync per step). Writes the token's keys/values at its
        slot; `cache.length` (the chunked path's cursor) is left alone."""
        cfg = self.config
        index = torch.as_tensor(index, device=code.device)
        slot = index + cfg.text_slots
        side = cfg.image_fmap_size
        x = self.image_emb(code[:, None]) + self.image_row(index // side) + self.image_col(index % side)
        for layer, block in enumerate(self.blocks):
            x = block.decode_step(x, slot, cache, layer)
        return self.to_image_logits(self.ln_f(x)[:, -1])

    def num_params(self, exclude_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in (self.text_emb, self.image_emb, self.text_pos, self.image_row, self.image_col))
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6N + attention, PaLM appendix B), for MFU accounting."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.depth * cfg.dim * cfg.seq_len


def image_offsets(kind: str, cfg: DalleConfig) -> torch.Tensor | None:
    """The raster distances d = query - key >= 0 at which `kind` lets an image query see an image key
    (every rule in attention.allowed depends on d alone); None for "full" (every earlier slot)."""
    if kind == "full":
        return None
    d = torch.arange(cfg.image_seq_len)
    last = torch.tensor(cfg.seq_len)  # a (virtual) query slot far enough in that every distance is an image key
    return d[allowed(kind, last, last - d, cfg.text_slots, cfg.image_fmap_size)]
