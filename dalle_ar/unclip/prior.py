"""The unCLIP diffusion prior (Ramesh et al. 2022, section 2.1): CLIP text embedding -> CLIP image embedding.

A decoder-only (causal) transformer reads, in order,

    [caption BPE tokens (text_len), text embedding, timestep, noised image embedding, learned query]

and its output at the query slot is the prediction of the *clean* image embedding x0 (the paper found
predicting x0 better than eps for the prior). Embeddings are unit-normalised CLIP vectors scaled by
`PriorConfig.scale` (sqrt(embed_dim) by default, stored in the checkpoint's config) so that each
coordinate has roughly unit variance, the scale the noise schedule is written for.

Classifier-free guidance: the caption and the text embedding are dropped together `text_drop_prob` of
the time (10%, paper); the null caption is the all-pad caption, the null text embedding is learned.
At sampling the paper draws two image embeddings and keeps the one with the higher dot product with
the text embedding (`sample(..., candidates=2)`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ar.config import DiffusionConfig, PriorConfig
from dalle_ar.model.attention import AttentionConfig
from dalle_ar.model.transformer import Block
from dalle_ar.text import null_caption
from dalle_ar.unclip import loop
from dalle_ar.unclip.diffusion import GaussianDiffusion, guided, timestep_embedding


class DiffusionPrior(nn.Module):
    def __init__(self, cfg: PriorConfig, diffusion: DiffusionConfig):
        super().__init__()
        self.config, self.diffusion_config = cfg, diffusion
        self.diffusion = GaussianDiffusion.from_config(diffusion.schedule, diffusion.timesteps, diffusion.target)
        d = cfg.dim
        self.token_embed = nn.Embedding(cfg.text_vocab_size + cfg.text_len, d)  # BPE ids + one pad id per slot
        self.text_embed_proj = nn.Linear(cfg.embed_dim, d)
        self.null_text_embed = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.image_embed_proj = nn.Linear(cfg.embed_dim, d)
        self.query = nn.Parameter(torch.randn(d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(cfg.text_len + 4, d) * 0.02)
        # the DALL-E transformer's pre-norm causal block (SDPA), at this width
        self.blocks = nn.ModuleList(Block(AttentionConfig(dim=d, heads=cfg.heads), "full") for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, cfg.embed_dim)

    @property
    def scale(self) -> float:
        return self.config.scale

    def muon_params(self) -> list[nn.Parameter]:
        """The transformer blocks' hidden matrices (attention and MLP weights) for `--optimizer muon`; the token,
        embedding and timestep projections, the output head, norms and biases train with AdamW."""
        return [p for p in self.blocks.parameters() if p.ndim >= 2]

    def null_text(self, batch: int, device) -> torch.Tensor:
        """The all-pad caption (text.null_caption)."""
        return null_caption(self.config.text_vocab_size, self.config.text_len, batch, device)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict, drop: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: noised scaled image embedding (B, D); cond: `text` (B, text_len) ids and `text_embed`
        (B, D) unit-norm CLIP text embedding; drop (B,) bool: rows that get the null condition.
        Returns the predicted diffusion target (x0 for the paper's prior), (B, D) float."""
        b, dtype = x_t.shape[0], self.out.weight.dtype
        text, text_embed = cond["text"], cond["text_embed"].float() * self.scale
        if drop is not None:
            keep = ~drop.to(x_t.device)
            text = torch.where(keep[:, None], text, self.null_text(b, text.device))
            text_embed = torch.where(keep[:, None], text_embed, self.null_text_embed.float() * self.scale)
        h = torch.cat([
            self.token_embed(text),
            self.text_embed_proj(text_embed.to(dtype))[:, None],
            self.time_mlp(timestep_embedding(t, self.config.dim).to(dtype))[:, None],
            self.image_embed_proj(x_t.to(dtype))[:, None],
            self.query.to(dtype).expand(b, 1, -1),
        ], dim=1) + self.pos_embed.to(dtype)
        for block in self.blocks:
            h = block(h)
        return self.out(self.ln_f(h[:, -1])).float()

    # -- training loss: inputs -> (anyone's) forward -> loss, so a training engine runs the forward itself
    def training_inputs(self, text: torch.Tensor, text_embed: torch.Tensor, image_embed: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[tuple, tuple]:
        """(forward args, loss targets): the scaled image embedding noised at a uniform t, the caption and
        text embedding dropped together `text_drop_prob` of the time."""
        x0 = F.normalize(image_embed.float(), dim=-1) * self.scale
        gen_device = generator.device if generator is not None else x0.device
        drop = (torch.rand(x0.shape[0], generator=generator, device=gen_device) < self.config.text_drop_prob).to(x0.device)
        cond = {"text": text, "text_embed": text_embed}
        x_t, t, noise = self.diffusion.noised(x0, generator)
        return (x_t, t, cond, drop), (x0, x_t, t, noise)

    def loss_from_output(self, out: torch.Tensor, target) -> tuple[torch.Tensor, dict]:
        """Diffusion loss on the scaled image embedding (MSE on the target, x0 by default)."""
        x0 = target[0]
        loss, extra = self.diffusion.training_loss(out, *target)
        cos = F.cosine_similarity(extra["x0_pred"], x0, dim=-1).mean()
        return loss, {"cos": cos.item()}

    def loss(self, text: torch.Tensor, text_embed: torch.Tensor, image_embed: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        args, target = self.training_inputs(text, text_embed, image_embed, generator)
        return self.loss_from_output(self(*args), target)

    @torch.no_grad()
    def sample(self, text: torch.Tensor, text_embed: torch.Tensor, *, steps: int = 64, guidance: float = 1.0,
               candidates: int = 2, sampler: str = "ddim", eta: float = 0.0, generator: torch.Generator | None = None,
               progress: bool = False) -> torch.Tensor:
        """Unit-norm image embeddings (B, D): `candidates` samples per caption, the one closest to the
        text embedding kept (paper section 2.1)."""
        b, d = text.shape[0], self.config.embed_dim
        text_embed = F.normalize(text_embed.float(), dim=-1)
        cond = {"text": text.repeat_interleave(candidates, 0), "text_embed": text_embed.repeat_interleave(candidates, 0)}
        diffusion = self.diffusion.respace(steps)
        x = loop.sample(diffusion, guided(self, cond, guidance), (b * candidates, d), sampler=sampler, eta=eta,
                        generator=generator, device=text.device, progress=progress)
        z = F.normalize(x, dim=-1).view(b, candidates, d)
        best = (z * text_embed[:, None]).sum(-1).argmax(1)
        return z[torch.arange(b, device=z.device), best]

    def export_config(self, **extra) -> dict:
        return {"kind": "unclip_prior", "prior": asdict(self.config), "diffusion": asdict(self.diffusion_config), **extra}


def build_prior(config: dict) -> DiffusionPrior:
    """From an export's config.json (`load_pretrained(path, build_prior)`)."""
    return DiffusionPrior(PriorConfig(**config["prior"]), DiffusionConfig(**config["diffusion"]))
