"""Gumbel-softmax discrete VAE (DALL-E section 2.1), laid out exactly like OpenAI's released `dall_e` dVAE.

Module tree and parameter names match `dall_e.encoder.Encoder` / `dall_e.decoder.Decoder`, so their
published weights load 1:1 (`dvae/openai.py`): every conv is a `Conv2d` holding `w` and `b`.

Encoder: `blocks.input` 7x7 conv, `blocks.group_1..group_G` of bottleneck resblocks (width n_hid * 1, 2,
4, 8, ...) with 2x max-pooling between groups, `blocks.output` ReLU + 1x1 conv to `num_tokens` logits.
Decoder: `blocks.input` 1x1 conv from the K-way (relaxed) one-hot to `n_init` channels, groups in
reverse order with 2x nearest upsampling, `blocks.output` ReLU + 1x1 conv to 6 channels: per RGB
channel the location and log-scale of a logit-Laplace distribution (paper appendix A.3).
Each resblock scales its residual branch by 1 / (number of resblocks)^2 (`post_gain`).

Pixels are mapped into [eps, 1 - eps] (`map_pixels`, eps = 0.1) before the encoder, as the
logit-Laplace likelihood is only defined on the open interval (0, 1).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from dvae.config import DVAEConfig

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[eps, 1 - eps] -> [0, 1] (clamped)."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


class Conv2d(nn.Module):
    """OpenAI's conv: parameters `w` (out, in, k, k) ~ N(0, 1/(in*k^2)) and `b` = 0, 'same' padding."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=(self.kw - 1) // 2)


class ResBlock(nn.Module):
    """Bottleneck residual block. Encoder kernels 3,3,3,1; decoder 1,3,3,3 (as OpenAI's)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width must be divisible by 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, k in enumerate(kernels, start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", Conv2d(widths[i - 1], widths[i], k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class _NearestUpsample2x(torch.autograd.Function):
    """2x nearest upsampling of a contiguous NCHW tensor: `F.interpolate(x, scale_factor=2, mode="nearest")` bit for
    bit, forward and backward, with a faster forward on CPU: in the demo dVAE's ~150 ms step (batch 32, 4-16 px, one
    thread) torch's NCHW kernel took 13 ms for the three upsamplings and these strided copies 4 ms. The gradient is
    torch's own kernel's, so training gives the same weights."""

    @staticmethod
    def forward(ctx, x):
        b, c, h, w = x.shape
        ctx.input_size = (b, c, h, w)
        out = x.new_empty(b, c, 2 * h, 2 * w)  # returned whole, not as a view: a later in-place op stays legal
        cells = out.view(b, c, h, 2, w, 2)
        cells[:, :, :, 0, :, 0] = x   # each pixel to both columns of its even row ...
        cells[:, :, :, 0, :, 1] = x
        cells[:, :, :, 1] = cells[:, :, :, 0]  # ... and the even rows to the odd ones
        return out

    @staticmethod
    def backward(ctx, grad):
        b, c, h, w = ctx.input_size
        return torch.ops.aten.upsample_nearest2d_backward(grad, [2 * h, 2 * w], [b, c, h, w], 2.0, 2.0)


class Upsample2x(nn.Module):
    """The decoder's 2x nearest upsampling (OpenAI's `nn.Upsample(scale_factor=2, mode="nearest")`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous():
            return _NearestUpsample2x.apply(x)
        return F.interpolate(x, scale_factor=2, mode="nearest")  # CUDA's kernel, and channels_last, as they are


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def _groups(cfg: DVAEConfig, widths: list[int], n_in: int, kernels, resample_name: str, resample) -> list:
    n_layers = cfg.group_count * cfg.n_blk_per_group
    groups = []
    for g, width in enumerate(widths, start=1):
        blocks = []
        for b in range(1, cfg.n_blk_per_group + 1):
            blocks.append((f"block_{b}", ResBlock(n_in, width, n_layers, kernels)))
            n_in = width
        if g < len(widths):
            blocks.append((resample_name, resample()))
        groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
    return groups


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in range(cfg.group_count)]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(3, widths[0], 7)),
            *_groups(cfg, widths, widths[0], ENCODER_KERNELS, "pool", lambda: nn.MaxPool2d(kernel_size=2)),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], cfg.num_tokens, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """map_pixels(images) (B, 3, H, W) -> logits (B, K, H/f, W/f)."""
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in reversed(range(cfg.group_count))]
        self.blocks = nn.Sequential(OrderedDict([
            ("input", Conv2d(cfg.num_tokens, cfg.n_init, 1)),
            *_groups(cfg, widths, cfg.n_init, DECODER_KERNELS, "upsample", Upsample2x),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], 6, 1))]))),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot (B, K, h, w) -> stats (B, 6, H, W): logit-Laplace location (3) and log-scale (3)."""
        return self.blocks(z)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Same as forward(one_hot(codes)), but the 1x1 input conv of a one-hot is a column lookup:
        no (B, K, h, w) one-hot tensor (2 GB at batch 64, K = 8192, 32x32)."""
        conv = self.blocks.input
        x = F.embedding(codes, conv.w[:, :, 0, 0].t()) + conv.b  # (B, h, w, n_init)
        return self.blocks[1:](x.permute(0, 3, 1, 2))


def stats_to_image(stats: torch.Tensor) -> torch.Tensor:
    """Decoder output -> the reconstruction in [0, 1]: unmap(sigmoid(location)), as OpenAI's release does."""
    return unmap_pixels(torch.sigmoid(stats[:, :3].float()))


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        if cfg.image_size % cfg.downsample:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by the downsampling factor "
                             f"{cfg.downsample} (2**(group_count-1)); change --image_size or --group_count")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def muon_params(self) -> list[nn.Parameter]:
        """The hidden conv kernels (every residual block's, shortcut convs included) for `--optimizer muon`, which
        treats a (out, in, k, k) kernel as an (out, in*k*k) matrix; the pixel-facing input and output convs, the code
        logits and the code embedding (the decoder's input conv), and the biases train with AdamW."""
        return [conv.w for half in (self.encoder, self.decoder) for m in half.blocks.modules()
                if isinstance(m, ResBlock) for conv in m.modules() if isinstance(conv, Conv2d)]

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> encoder logits (B, K, h, w). The encoder runs on channels_last (NHWC)
        activations, which the CPU (oneDNN) and GPU convolutions run faster: 1.5x for train/encode.py on a 2-core
        CPU, with the same codes but for near-ties (7 of the demo's 2,048,000 differ from NCHW's)."""
        return self.encoder(map_pixels(images.contiguous(memory_format=torch.channels_last)))

    def forward(self, images: torch.Tensor, temperature: float = 1.0, hard: bool | None = None):
        """Training pass: returns (decoder stats (B, 6, H, W), encoder logits (B, K, h, w))."""
        logits = self.logits(images)
        hard = self.config.straight_through if hard is None else hard
        z = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1)
        return self.decoder(z.to(logits.dtype)), logits

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, h, w) long (argmax, as at DALL-E training time)."""
        return self.logits(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) or (B, h*w) -> images (B, 3, H, W) in [0, 1]."""
        if codes.ndim == 2:
            side = int(codes.shape[1] ** 0.5)
            codes = codes.view(codes.shape[0], side, side)
        return stats_to_image(self.decoder.from_codes(codes))
