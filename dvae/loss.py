"""dVAE objective (DALL-E section 2.1, appendix A.2-A.3).

loss = [ -log p(x | z) + beta * KL(q(z | x) || U(K)) ] / (H * W * 3), averaged over the batch, where the
reconstruction likelihood is the logit-Laplace distribution over pixels mapped into [eps, 1 - eps], the
KL is summed over the grid, the gumbel temperature tau is cosine-annealed 1 -> 1/16 and beta cosine-ramped
0 -> 6.6. MSE / L1 reconstruction are options for comparison (the KL term is normalised the same way).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dvae.config import DVAELossConfig
from dvae.model import map_pixels, stats_to_image


def logit_laplace_nll(stats: torch.Tensor, images: torch.Tensor, min_scale: float = 0.0) -> torch.Tensor:
    """Per-element negative log-likelihood of `images` in [0, 1] under the logit-Laplace distribution.

    The decoder's 6 channels are location mu (in logit space) and log-scale ln b per RGB channel; for
    y = map_pixels(x) in (0, 1):  p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)).  Returns (B, 3, H, W).
    `min_scale` > 0 bounds b from below (b = exp(ln b) + min_scale; see DVAELossConfig.min_scale)."""
    mu, log_b = stats[:, :3].float(), stats[:, 3:].float()
    if min_scale > 0:  # b = exp(log_b) + min_scale, smoothly
        log_b = torch.logaddexp(log_b, torch.tensor(math.log(min_scale), device=log_b.device))
    y = map_pixels(images.float())
    return (torch.logit(y) - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(y) + torch.log1p(-y)


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || U(K)) per grid cell = sum_k q log q + log K; logits (B, K, h, w) -> (B, h, w)."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return (log_q.exp() * log_q).sum(dim=1) + math.log(logits.shape[1])


def entropy_penalty(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean per-cell entropy H(q(z|x)), entropy of the batch-mean code distribution H(E_x q)).

    Minimising `cell - batch` (the codebook entropy penalty of MAGVIT-v2, Yu et al. 2023,
    "Language Model Beats Diffusion", section 3.1; a mutual-information bound as in IIC) asks each
    cell for a confident code while spreading codes over the whole codebook across the batch."""
    log_q = F.log_softmax(logits.float(), dim=1)
    q = log_q.exp()
    cell = -(q * log_q).sum(dim=1).mean()
    mean_q = q.mean(dim=(0, 2, 3))
    batch = -(mean_q * torch.log(mean_q + 1e-9)).sum()
    return cell, batch


def codebook_usage(codes: torch.Tensor, num_tokens: int) -> tuple[float, float]:
    """(fraction of the codebook used, perplexity exp(H(code histogram))) of a batch or split of codes."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=num_tokens).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return (counts > 0).double().mean().item(), math.exp(entropy)


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    """Cosine from `start` at step 0 to `end` at step `total`, constant after."""
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def temperature(step: int, cfg: DVAELossConfig) -> float:
    return cosine_anneal(step, cfg.temperature_anneal_steps, cfg.temperature_start, cfg.temperature_end)


def kl_weight(step: int, cfg: DVAELossConfig) -> float:
    return cosine_anneal(step, cfg.kl_anneal_steps, 0.0, cfg.kl_weight)


def reconstruction_loss(kind: str, stats: torch.Tensor, images: torch.Tensor, min_scale: float = 0.0) -> torch.Tensor:
    """Mean per pixel value of the chosen reconstruction loss."""
    if kind == "logit_laplace":
        return logit_laplace_nll(stats, images, min_scale).mean()
    if kind == "mse":
        return F.mse_loss(stats_to_image(stats), images.float())
    if kind == "l1":
        return F.l1_loss(stats_to_image(stats), images.float())
    raise ValueError(f"reconstruction={kind!r}: use one of {DVAELossConfig.RECONSTRUCTIONS}")


def random_crop(images: torch.Tensor, size: int, cell: int) -> torch.Tensor:
    """One random `size` x `size` window of the batch with its corner on the `cell` grid, so the crop's codes are
    those of whole-image encoding. Offsets come from torch's RNG, which the engine checkpoints (a resume crops alike)."""
    h, w = images.shape[-2:]
    y = torch.randint(0, (h - size) // cell + 1, ()).item() * cell
    x = torch.randint(0, (w - size) // cell + 1, ()).item() * cell
    return images[..., y:y + size, x:x + size]


def dvae_loss(model, images: torch.Tensor, step: int, cfg: DVAELossConfig):
    """One training loss with the schedules at `step` (cfg already scaled to the run, see `scaled`). With
    `cfg.crop_size`, the loss is on one random grid-aligned crop of the batch."""
    if cfg.crop_size:
        images = random_crop(images, cfg.crop_size, getattr(model, "module", model).config.downsample)
    images = images.contiguous(memory_format=torch.channels_last)  # as the encoder takes them (DVAE.logits)
    tau, beta = temperature(step, cfg), kl_weight(step, cfg)
    stats, logits = model(images, temperature=tau)
    rec = reconstruction_loss(cfg.reconstruction, stats, images, cfg.min_scale)
    kl = kl_to_uniform(logits)                        # (B, h, w) nats per cell
    pixels_per_image = images[0].numel()               # H * W * 3
    kl_term = kl.sum(dim=(1, 2)).mean() / pixels_per_image
    loss = rec + beta * kl_term
    with torch.no_grad():  # the MSE objective already is this metric
        mse = rec.detach() if cfg.reconstruction == "mse" else F.mse_loss(stats_to_image(stats), images.float())
        used, perplexity = codebook_usage(logits.argmax(dim=1), logits.shape[1])
    metrics = {"recon": rec.item(), "recon_mse": mse.item(), "kl_per_cell": kl.mean().item(), "tau": tau,
               "kl_weight": beta, "codes_used": used, "perplexity": perplexity}
    if cfg.entropy_weight:
        cell, batch = entropy_penalty(logits)
        loss = loss + cfg.entropy_weight * (cfg.entropy_cell_weight * cell - batch)
        metrics["cell_entropy"] = cell.item()
        metrics["batch_entropy"] = batch.item()
    return loss, metrics
