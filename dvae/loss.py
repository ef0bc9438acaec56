"""dVAE objective (DALL-E section 2.1 and appendix A.2): reconstruction + beta * KL(q || uniform),
with the relaxation temperature annealed from 1 to 1/16 and the KL weight increased from 0 to beta."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_to_uniform(logits: torch.Tensor) -> torch.Tensor:
    """Mean over grid cells of KL(q(z|x) || U(K)) = sum_k q log q + log K (logits: B, K, h, w)."""
    log_q = F.log_softmax(logits.float(), dim=1)
    return (log_q.exp() * log_q).sum(dim=1).mean() + math.log(logits.shape[1])


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


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon.float(), images.float())


def cosine_anneal(step: int, total: int, start: float, end: float) -> float:
    t = min(max(step / max(total, 1), 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * t))


def temperature(step: int, anneal_steps: int, start: float = 1.0, end: float = 1 / 16) -> float:
    return cosine_anneal(step, anneal_steps, start, end)


def kl_weight(step: int, anneal_steps: int, beta: float) -> float:
    return cosine_anneal(step, anneal_steps, 0.0, beta)


def dvae_loss(model, images: torch.Tensor, step: int, *, anneal_steps: int, beta: float,
              temp_start: float = 1.0, temp_end: float = 1 / 16, entropy: float = 0.0,
              entropy_cell: float = 1.0):
    tau = temperature(step, anneal_steps, temp_start, temp_end)
    recon, logits = model(images, temperature=tau)
    rec = reconstruction_loss(recon, images)
    kl = kl_to_uniform(logits)
    w = kl_weight(step, anneal_steps, beta)
    loss = rec + w * kl
    metrics = {"recon_mse": rec.item(), "kl": kl.item(), "tau": tau, "kl_weight": w}
    if entropy:
        cell, batch = entropy_penalty(logits)
        loss = loss + entropy * (entropy_cell * cell - batch)
        metrics["cell_entropy"] = cell.item()
        metrics["batch_entropy"] = batch.item()
    return loss, metrics
