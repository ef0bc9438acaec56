"""Reconstruction quality: PSNR and SSIM per image (images in [0, 1], (B, 3, H, W)).

SSIM follows Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, 'valid'
filtering, per-channel maps averaged (what skimage's `structural_similarity(gaussian_weights=True)` and
torchmetrics compute). Codebook usage and perplexity live next to the loss (`dvae.loss.codebook_usage`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(max^2 / MSE); (B,) tensor (inf for identical)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(max_value ** 2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).float()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, max_value: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image, (B,) in [-1, 1]; 1 for identical images."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.device)
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2

    def blur(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
