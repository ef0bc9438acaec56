"""Gumbel-softmax discrete VAE (DALL-E section 2.1), laid out like OpenAI's released `dall_e` dVAE.

Encoder: 7x7 conv, then `group_count` groups of bottleneck resblocks (width n_hid * 1, 2, 4, 8, ...)
with 2x max-pooling between groups, then ReLU + 1x1 conv to `num_tokens` logits per grid cell.
Decoder: 1x1 conv from the K-way (relaxed) one-hot to `n_init` channels, groups in reverse order with
2x nearest upsampling between them, then ReLU + 1x1 conv to RGB. Each resblock scales its residual
branch by 1 / (number of resblocks)^2 (OpenAI's `post_gain`) so deep stacks start near identity.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dalle_ar.config import DVAEConfig


class EncoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_out, 1),
        )

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            nn.ReLU(), nn.Conv2d(n_in, n_hid, 1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_hid, 3, padding=1),
            nn.ReLU(), nn.Conv2d(n_hid, n_out, 3, padding=1),
        )

    def forward(self, x):
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(cfg: DVAEConfig, block, widths: list[int], n_in: int, resample) -> tuple[nn.Sequential, int]:
    n_layers = cfg.group_count * cfg.n_blk_per_group
    groups = nn.Sequential()
    for g, width in enumerate(widths, start=1):
        blocks = nn.Sequential()
        for b in range(1, cfg.n_blk_per_group + 1):
            blocks.add_module(f"block_{b}", block(n_in, width, n_layers))
            n_in = width
        if g < len(widths):
            blocks.add_module("resample", resample())
        groups.add_module(f"group_{g}", blocks)
    return groups, n_in


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in range(cfg.group_count)]
        self.input = nn.Conv2d(3, widths[0], 7, padding=3)
        self.groups, n_out = _groups(cfg, EncoderBlock, widths, widths[0], lambda: nn.MaxPool2d(2))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(n_out, cfg.num_tokens, 1))
        if cfg.zero_logit_bias:
            nn.init.zeros_(self.output[1].bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, K, H/f, W/f)."""
        x = 2 * images - 1
        return self.output(self.groups(self.input(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        widths = [cfg.n_hid * 2 ** g for g in reversed(range(cfg.group_count))]
        self.input = nn.Conv2d(cfg.num_tokens, cfg.n_init, 1)
        self.groups, n_out = _groups(cfg, DecoderBlock, widths, cfg.n_init,
                                     lambda: nn.Upsample(scale_factor=2, mode="nearest"))
        self.output = nn.Sequential(nn.ReLU(), nn.Conv2d(n_out, 3, 1))

    def forward(self, one_hot: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot (B, K, h, w) -> image logits (B, 3, H, W); sigmoid gives [0, 1]."""
        return self.output(self.groups(self.input(one_hot)))


class DiscreteVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, images: torch.Tensor, temperature: float = 1.0):
        """Training pass: returns (reconstruction in [0,1], encoder logits)."""
        logits = self.encoder(images)
        soft_one_hot = F.gumbel_softmax(logits.float(), tau=temperature, hard=self.config.straight_through, dim=1)
        recon = torch.sigmoid(self.decoder(soft_one_hot.to(logits.dtype)))
        return recon, logits

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, h, w) long (argmax, as at DALL-E training time)."""
        return self.encoder(images).argmax(dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) or (B, h*w) -> images (B, 3, H, W) in [0, 1]."""
        if codes.ndim == 2:
            side = int(codes.shape[1] ** 0.5)
            codes = codes.view(codes.shape[0], side, side)
        one_hot = F.one_hot(codes, self.config.num_tokens).permute(0, 3, 1, 2)
        dtype = self.decoder.input.weight.dtype
        return torch.sigmoid(self.decoder(one_hot.to(dtype)).float())
