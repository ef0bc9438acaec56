"""The unCLIP decoder (Ramesh et al. 2022, section 2.1): an ADM U-Net (Dhariwal & Nichol 2021) that
denoises images conditioned on a CLIP image embedding, and the same U-Net as an upsampler.

Conditioning, as in the paper (which modifies GLIDE):
  - the projected CLIP image embedding is added to the timestep embedding, which every residual block
    applies as a scale and shift after its first GroupNorm (ADM's "AdaGN");
  - the embedding is also projected to `clip_tokens` (4) extra context tokens that every attention layer
    concatenates to its keys and values;
  - optionally the caption (project BPE) runs through a small causal transformer (GLIDE's text encoder):
    its tokens join the context, its last token joins the timestep embedding.
For classifier-free guidance the image embedding is replaced by a learned null embedding 10% of the time
and the caption by the all-pad caption 50% of the time (paper section 2.1).

Upsampler (`low_res_size > 0`): the low-resolution image, bilinearly resized to the output size, is
concatenated to the noised input; during training it is corrupted with a Gaussian blur (paper
section 2.1: "we slightly corrupt the conditioning image ... with gaussian blur" for the first stage).
The upsampler is trained on its own and takes no embedding or caption (the paper found no benefit). With
`low_res_residual` it diffuses the image minus that resized low-res input (SRDiff, Li et al. 2022), and sampling
adds the input back: colours the input already has need no generating, so a short run keeps them.

Images are [0, 1] at the API edge and [-1, 1] inside the diffusion.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dalle_ar.config import DiffusionConfig, UnetConfig
from dalle_ar.model.attention import AttentionConfig
from dalle_ar.model.transformer import Block
from dalle_ar.text import null_caption
from dalle_ar.unclip import loop
from dalle_ar.unclip.diffusion import GaussianDiffusion, guided, timestep_embedding


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Residual branches start as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then AdaGN: norm(h) * (1 + scale) + shift from the (timestep + condition)
    embedding, SiLU-dropout-conv; residual connection (1x1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = group_norm(cout)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


def sin_cos_2d(channels: int, side: int) -> torch.Tensor:
    """(channels, side * side) fixed position table, row-major over a side x side map: the first half of the
    channels encodes the row, the second the column, each as sines and cosines of geometric frequencies."""
    if channels % 4:
        raise ValueError(f"a 2D sine-cosine position table needs channels divisible by 4, got {channels}")
    quarter = channels // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    angles = torch.arange(side, dtype=torch.float64)[:, None] * freqs[None]  # (side, quarter)
    one_axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (side, channels / 2)
    rows = one_axis[:, None, :].expand(side, side, -1)
    cols = one_axis[None, :, :].expand(side, side, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, channels).T.float().contiguous()


class AttentionBlock(nn.Module):
    """Self-attention over the feature map; context tokens (CLIP tokens, caption) are concatenated to
    the keys and values (GLIDE / unCLIP). With `side`, a 2D sine-cosine position table (fixed, not saved) is added
    to the normalised input (UnetConfig.attention_pos_embed)."""

    def __init__(self, channels: int, head_channels: int, context_dim: int, side: int = 0):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero_init(nn.Conv1d(channels, channels, 1))
        self.register_buffer("pos", sin_cos_2d(channels, side) if side else None, persistent=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2)
        if self.pos is not None:
            if self.pos.shape[1] != hh * ww:
                raise ValueError(f"this attention layer's position table is for {self.pos.shape[1]} pixels, got a "
                                 f"{hh}x{ww} map: run the decoder at its configured image_size")
            h = h + self.pos.to(h.dtype)
        q, k, v = rearrange(self.qkv(h), "b (three h d) n -> three b h n d", three=3, h=self.heads)
        if context is not None and self.context_kv is not None:
            ck, cv = rearrange(self.context_kv(context), "b m (two h d) -> two b h m d", two=2, h=self.heads)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b h n d -> b (h d) n")).view(b, c, hh, ww)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.ModuleList):
    """A run of layers at one resolution; residual blocks take the embedding, attention the context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UnetDecoder(nn.Module):
    def __init__(self, cfg: UnetConfig, diffusion: DiffusionConfig):
        super().__init__()
        self.config, self.diffusion_config = cfg, diffusion
        if cfg.low_res_residual and not cfg.low_res_size:
            raise ValueError("low_res_residual is for upsamplers: set low_res_size too, or drop low_res_residual")
        # predicted x0 is clipped to the image range at every sampling step (ADM's clip_denoised); a residual
        # (image minus resized input, both in [-1, 1]) spans [-2, 2]
        self.diffusion = GaussianDiffusion.from_config(diffusion.schedule, diffusion.timesteps, diffusion.target,
                                                       clip_x0=2.0 if cfg.low_res_residual else 1.0)
        ch, emb_dim = cfg.channels, 4 * cfg.channels
        self.emb_dim, self.context_dim = emb_dim, emb_dim if (cfg.embed_dim or cfg.use_caption) else 0
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.embed_dim:
            self.null_image_embed = nn.Parameter(torch.zeros(cfg.embed_dim))
            self.image_embed_proj = nn.Linear(cfg.embed_dim, emb_dim)
            self.clip_to_tokens = nn.Linear(cfg.embed_dim, cfg.clip_tokens * emb_dim)
        if cfg.use_caption:
            self.token_embed = nn.Embedding(cfg.text_vocab_size + cfg.text_len, emb_dim)
            self.text_pos = nn.Parameter(torch.randn(cfg.text_len, emb_dim) * 0.02)
            self.text_blocks = nn.ModuleList([Block(AttentionConfig(dim=emb_dim, heads=max(1, emb_dim // 64)), "full")])
            self.text_ln = nn.LayerNorm(emb_dim)
            self.text_pool_proj = nn.Linear(emb_dim, emb_dim)

        in_ch = 6 if cfg.low_res_size else 3
        mults, attn_sides = cfg.mults, set(cfg.attention_sides)

        def pos(side: int) -> int:  # the side an attention layer's position table covers (0: none)
            return side if cfg.attention_pos_embed == "sin_cos_2d" else 0

        self.input_conv = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.down, skips, cur, side = nn.ModuleList(), [ch], ch, cfg.image_size
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(cur, ch * mult, emb_dim, cfg.dropout)]
                cur = ch * mult
                if side in attn_sides:
                    layers.append(AttentionBlock(cur, cfg.head_channels, self.context_dim, pos(side)))
                self.down.append(Stage(layers))
                skips.append(cur)
            if level < len(mults) - 1:
                self.down.append(Stage([Downsample(cur)]))
                skips.append(cur)
                side //= 2
        self.middle = Stage([ResBlock(cur, cur, emb_dim, cfg.dropout),
                             AttentionBlock(cur, cfg.head_channels, self.context_dim, pos(side)),
                             ResBlock(cur, cur, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cur + skips.pop(), ch * mult, emb_dim, cfg.dropout)]
                cur = ch * mult
                if side in attn_sides:
                    layers.append(AttentionBlock(cur, cfg.head_channels, self.context_dim, pos(side)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                    side *= 2
                self.up.append(Stage(layers))
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), zero_init(nn.Conv2d(cur, 3, 3, padding=1)))

    def muon_params(self) -> list[nn.Parameter]:
        """The U-Net's hidden weights for `--optimizer muon` (at ZeRO stage 0, which steps a kernel as an
        (out, in*k*k) matrix): every residual block's, attention block's and resampler's kernels and matrices
        in the down, middle and up paths. The pixel-facing input and output convs, the timestep and
        conditioning embeddings, the caption encoder, norms and biases train with AdamW."""
        return [p for path in (self.down, self.middle, self.up) for p in path.parameters() if p.ndim >= 2]

    # -- conditioning ------------------------------------------------------------------------------
    def null_text(self, batch: int, device) -> torch.Tensor:
        return null_caption(self.config.text_vocab_size, self.config.text_len, batch, device)

    def _condition(self, emb: torch.Tensor, cond: dict, drop_image, drop_text):
        """Add the image embedding / caption to the timestep embedding; return (emb, context tokens)."""
        cfg, b, dtype, context = self.config, emb.shape[0], emb.dtype, []
        if cfg.embed_dim:
            z = cond.get("image_embed")
            null = self.null_image_embed.to(dtype).expand(b, -1)
            z = null if z is None else torch.where(drop_image[:, None], null, z.to(dtype))
            emb = emb + self.image_embed_proj(z)
            context.append(rearrange(self.clip_to_tokens(z), "b (m d) -> b m d", m=cfg.clip_tokens))
        if cfg.use_caption:
            text = cond.get("text")
            null = self.null_text(b, emb.device)
            text = null if text is None else torch.where(drop_text[:, None], null, text)
            h = self.token_embed(text) + self.text_pos.to(dtype)
            for block in self.text_blocks:
                h = block(h)
            h = self.text_ln(h)
            emb = emb + self.text_pool_proj(h[:, -1])  # causal: the last slot has read the whole caption
            context.append(h)
        return emb, (torch.cat(context, dim=1) if context else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, drop=None) -> torch.Tensor:
        """x: noised images (B, 3, S, S) in the diffusion's [-1, 1] space; t: (B,) timesteps; cond:
        `image_embed` (B, D), `text` (B, text_len) ids, `low_res` (B, 3, s, s) in [-1, 1] (upsampler);
        drop: (B,) bool dropping every condition, or {"image": mask, "text": mask}. Missing conditions
        count as dropped. Returns the diffusion target (float)."""
        b, dtype = x.shape[0], self.input_conv.weight.dtype
        if drop is None:
            drop = torch.zeros(b, dtype=torch.bool, device=x.device)
        drop_image, drop_text = (drop["image"], drop["text"]) if isinstance(drop, dict) else (drop, drop)
        emb = self.time_embed(timestep_embedding(t, self.config.channels).to(dtype))
        emb, context = self._condition(emb, cond, drop_image.to(x.device), drop_text.to(x.device))
        if self.config.low_res_size:
            x = torch.cat([x.float(), self.resized_low_res(cond)], dim=1)
        h = self.input_conv(x.to(dtype))
        hs = [h]
        for stage in self.down:
            h = stage(h, emb, context)
            hs.append(h)
        h = self.middle(h, emb, context)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).float()

    def resized_low_res(self, cond: dict) -> torch.Tensor:
        """The upsampler's low-res condition, bilinearly resized to the output size ([-1, 1])."""
        s = self.config.image_size
        return F.interpolate(cond["low_res"].float(), size=(s, s), mode="bilinear", align_corners=False)

    # -- training ----------------------------------------------------------------------------------
    def low_res_condition(self, images: torch.Tensor, generator: torch.Generator | None = None,
                          blur: bool = True) -> torch.Tensor:
        """Upsampler input: images downsampled to low_res_size, blurred (training), in [-1, 1]."""
        low = F.interpolate(images.float(), size=self.config.low_res_size, mode="bicubic", antialias=True,
                            align_corners=False).clamp(0, 1)
        if blur:
            from torchvision.transforms.functional import gaussian_blur

            gen_device = generator.device if generator is not None else "cpu"
            u = torch.rand((), generator=generator, device=gen_device).item()
            sigma = 0.4 + (max(self.config.blur_sigma_max, 0.4) - 0.4) * u  # one sigma per batch
            low = gaussian_blur(low, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=sigma)
        return low * 2 - 1

    def training_inputs(self, images: torch.Tensor, image_embed: torch.Tensor | None = None,
                        text: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[tuple, tuple]:
        """(forward args, loss targets) for [0, 1] images (B, 3, S, S), with the paper's condition dropout."""
        cfg = self.config
        b, device = images.shape[0], images.device
        gen_device = generator.device if generator is not None else device
        drop = {"image": (torch.rand(b, generator=generator, device=gen_device) < cfg.image_embed_drop).to(device),
                "text": (torch.rand(b, generator=generator, device=gen_device) < cfg.caption_drop).to(device)}
        cond = {}
        if cfg.embed_dim:
            cond["image_embed"] = F.normalize(image_embed.float(), dim=-1)
        if cfg.use_caption and text is not None:
            cond["text"] = text
        if cfg.low_res_size:
            cond["low_res"] = self.low_res_condition(images, generator)
        x0 = images.float() * 2 - 1
        if self.config.low_res_residual:
            x0 = x0 - self.resized_low_res(cond)
        x_t, t, noise = self.diffusion.noised(x0, generator)
        return (x_t, t, cond, drop), (x0, x_t, t, noise)

    def loss_from_output(self, out: torch.Tensor, target) -> tuple[torch.Tensor, dict]:
        return self.diffusion.training_loss(out, *target)[0], {}

    def loss(self, images: torch.Tensor, image_embed: torch.Tensor | None = None, text: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Diffusion loss on [0, 1] images (B, 3, S, S), this module running the forward."""
        args, target = self.training_inputs(images, image_embed, text, generator)
        return self.loss_from_output(self(*args), target)

    # -- sampling ----------------------------------------------------------------------------------
    def condition(self, image_embed=None, text=None, low_res=None) -> dict:
        """The cond dict from [0, 1] / unit-norm inputs (None = not given)."""
        cond = {}
        if image_embed is not None and self.config.embed_dim:
            cond["image_embed"] = F.normalize(image_embed.float(), dim=-1)
        if text is not None and self.config.use_caption:
            cond["text"] = text
        if low_res is not None and self.config.low_res_size:
            cond["low_res"] = F.interpolate(low_res.float(), size=self.config.low_res_size, mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1) * 2 - 1
        return cond

    @torch.no_grad()
    def sample(self, image_embed: torch.Tensor | None = None, text: torch.Tensor | None = None,
               low_res: torch.Tensor | None = None, *, steps: int = 50, guidance: float = 1.0,
               text_guidance: float | None = None, sampler: str = "ddim", eta: float = 0.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               batch: int | None = None, progress: bool = False) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1]. Guidance mixes the full condition with the all-dropped one; with
        `text_guidance` (a decoder that reads the caption) the caption gets its own scale (`diffusion.guided`)."""
        if text_guidance is not None and not (self.config.use_caption and text is not None):
            raise ValueError("text_guidance needs a decoder trained with --use_caption, and captions")
        cond = self.condition(image_embed, text, low_res)
        ref = next((v for v in (image_embed, text, low_res, noise) if v is not None), None)
        b = batch or ref.shape[0]
        device = ref.device if ref is not None else next(self.parameters()).device
        s = self.config.image_size
        diffusion = self.diffusion.respace(steps)
        x = loop.sample(diffusion, guided(self, cond, guidance, text_guidance), (b, 3, s, s), sampler=sampler, eta=eta,
                        generator=generator, device=device, noise=noise, progress=progress)
        if self.config.low_res_residual:
            x = x + self.resized_low_res(cond)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, image_embed: torch.Tensor | None = None, text: torch.Tensor | None = None,
               *, steps: int = 50, progress: bool = False) -> torch.Tensor:
        """DDIM inversion: the noise x_T that the eta = 0 sampler maps back to (about) `images`."""
        cond = self.condition(image_embed, text)
        drop = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        return loop.ddim_invert(self.diffusion.respace(steps), lambda x, t: self(x, t, cond, drop),
                                images.float() * 2 - 1, progress=progress)

    def export_config(self, **extra) -> dict:
        return {"kind": "unclip_decoder", "unet": asdict(self.config), "diffusion": asdict(self.diffusion_config), **extra}


def build_decoder(config: dict) -> UnetDecoder:
    """From an export's config.json (`load_pretrained(path, build_decoder)`)."""
    return UnetDecoder(UnetConfig(**config["unet"]), DiffusionConfig(**config["diffusion"]))
