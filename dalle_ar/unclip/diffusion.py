"""One Gaussian diffusion core for the unCLIP prior and decoder (DDPM, Ho et al. 2020; improved DDPM,
Nichol & Dhariwal 2021; DDIM, Song et al. 2021; classifier-free guidance, Ho & Salimans 2021).

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)

A network predicts one of three equivalent targets at (x_t, t): eps (the noise), x0 (the clean
sample; the unCLIP prior, paper section 2.2) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho
2022). Everything else (posterior mean, DDIM update) is computed from the implied x0 and eps.

Sampling runs on a respaced subset of the training timesteps (`respace(n)`, improved DDPM section 4):
the respaced process has its own betas over the kept steps and passes the *original* timestep to the
network through `timestep_map`. Every random draw takes an explicit `torch.Generator`.

Like a diffusers scheduler, `GaussianDiffusion` is arithmetic on tensors and never calls the network:
`noised` / `training_loss` bracket the training forward, and `ddpm_step` / `ddim_step` / `ddim_invert_step`
turn one network output into the next sample (`model_timesteps` says which timestep the network sees).
The loops, with their progress bar, live in unclip/loop.py.

Guidance: a `model_fn(x, t, cond, drop)` runs the network with conditioning `cond` (a dict of batched
tensors) where `drop` (B,) bool says which rows see the null condition; `guided(...)` runs the
conditional and unconditional rows in one forward and mixes them as u + s (c - u). A decoder that reads both an
image embedding and a caption can have the caption guided on its own scale (`text_scale`, below).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

SCHEDULES = ("cosine", "linear")
TARGETS = ("eps", "x0", "v")

ModelFn = Callable[[torch.Tensor, torch.Tensor, dict, torch.Tensor], torch.Tensor]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, original timesteps) -> output


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """abar_t = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2) (improved DDPM eq. 17), with betas
    clipped at 0.999 so the last step stays invertible."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def linear_alphas_cumprod(timesteps: int) -> torch.Tensor:
    """DDPM's betas 1e-4 .. 0.02 over 1000 steps, rescaled for other lengths (improved DDPM)."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def alphas_cumprod(schedule: str, timesteps: int) -> torch.Tensor:
    if schedule == "cosine":
        return cosine_alphas_cumprod(timesteps)
    if schedule == "linear":
        return linear_alphas_cumprod(timesteps)
    raise ValueError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")


def _extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] as float32 on x's device, shaped to broadcast over x (B, ...)."""
    return values.to(t.device)[t].float().view(-1, *([1] * (x.ndim - 1)))


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    # Draw on the generator's device, then move: the same seed gives the same noise on CPU and CUDA
    # when the generator is a CPU one.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


class GaussianDiffusion:
    """Schedule + loss + sampler steps; holds no parameters and never runs the network."""

    def __init__(self, alphas_cumprod: torch.Tensor, target: str = "eps", timestep_map: torch.Tensor | None = None,
                 clip_x0: float | None = None):
        if target not in TARGETS:
            raise ValueError(f"target={target!r}: use one of {', '.join(TARGETS)}")
        self.target, self.clip_x0 = target, clip_x0
        acp = alphas_cumprod.double()
        self.num_timesteps = len(acp)
        self.timestep_map = torch.arange(len(acp)) if timestep_map is None else timestep_map.long()
        self.alphas_cumprod = acp
        self.alphas_cumprod_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.betas = 1 - acp / self.alphas_cumprod_prev
        self.sqrt_acp, self.sqrt_one_minus_acp = acp.sqrt(), (1 - acp).sqrt()
        # posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7); its variance is the "fixed small" sampler variance
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - acp)
        # variance is 0 at t=0: log of the t=1 value there (as improved DDPM) keeps it finite
        self.posterior_log_variance = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]).log()
        self.posterior_coef_x0 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - acp)
        self.posterior_coef_xt = (1 - self.alphas_cumprod_prev) * (1 - self.betas).sqrt() / (1 - acp)

    @classmethod
    def from_config(cls, schedule: str, timesteps: int, target: str, clip_x0: float | None = None) -> "GaussianDiffusion":
        return cls(alphas_cumprod(schedule, timesteps), target, clip_x0=clip_x0)

    def respace(self, steps: int) -> "GaussianDiffusion":
        """The same process on `steps` evenly spaced timesteps (always including the last and first):
        betas_i = 1 - abar_{t_i} / abar_{t_{i-1}} keep the marginals q(x_t | x_0) of the kept steps."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"respace: steps={steps} must be in 1..{self.num_timesteps}")
        keep = torch.linspace(0, self.num_timesteps - 1, steps).round().long().unique()
        return GaussianDiffusion(self.alphas_cumprod[keep], self.target, self.timestep_map[keep], self.clip_x0)

    # -- the forward process and the target conversions ------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return _extract(self.sqrt_acp, t, x0) * x0 + _extract(self.sqrt_one_minus_acp, t, x0) * noise

    def target_of(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.target == "eps":
            return noise
        if self.target == "x0":
            return x0
        return _extract(self.sqrt_acp, t, x0) * noise - _extract(self.sqrt_one_minus_acp, t, x0) * x0

    def x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the network output `out` at (x_t, t)."""
        a, s = _extract(self.sqrt_acp, t, x_t), _extract(self.sqrt_one_minus_acp, t, x_t)
        if self.target == "eps":
            x0 = (x_t - s * out) / a
        elif self.target == "x0":
            x0 = out
        else:
            x0 = a * x_t - s * out
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
        return x0, (x_t - a * x0) / s

    # -- training: noised inputs -> (the caller's) network forward -> loss ------------------------------
    def sample_t(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=gen_device).to(device)

    def noised(self, x0: torch.Tensor, generator: torch.Generator | None = None,
               t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, noise) at a uniform t (unless given) for the float32 clean sample x0."""
        t = self.sample_t(x0.shape[0], x0.device, generator) if t is None else t
        noise = _randn(x0.shape, generator, x0.device)
        return self.q_sample(x0, t, noise), t, noise

    def training_loss(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      noise: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """MSE between the network output at (x_t, t) and its target. Returns (loss, extras) with `x0_pred`
        (for metrics such as the prior's cosine to the true embedding)."""
        out = out.float()
        loss = F.mse_loss(out, self.target_of(x0, noise, t))
        return loss, {"x0_pred": self.x0_eps(out.detach(), x_t, t)[0], "t": t}

    # -- sampling steps: one network output -> the next sample (the loops are in unclip/loop.py) -------
    def timesteps(self, reverse: bool = True) -> range:
        """Respaced step indices in sampling order (reverse) or inversion order."""
        return range(self.num_timesteps - 1, -1, -1) if reverse else range(self.num_timesteps)

    def model_timesteps(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """(B,) original timesteps the network sees at respaced step `step`."""
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        return self.timestep_map.to(x.device)[i]

    def initial_noise(self, shape, generator: torch.Generator | None = None, device="cpu",
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_T: `noise` if given, else a draw from `generator`."""
        return _randn(shape, generator, device) if noise is None else noise.float().to(device)

    def ddpm_step(self, out: torch.Tensor, step: int, x: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
        """Ancestral sampling: x_{t-1} = mean + sigma z with the posterior mean and ("fixed small")
        variance of p(x_{t-1} | x_t) (no noise at the last step)."""
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, eps = self.x0_eps(out.float(), x, i)
        mean = _extract(self.posterior_coef_x0, i, x) * x0 + _extract(self.posterior_coef_xt, i, x) * x
        log_variance = _extract(self.posterior_log_variance, i, x)
        z = _randn(x.shape, generator, x.device)  # drawn every step so DDPM and DDIM share a stream
        return mean + (step > 0) * (0.5 * log_variance).exp() * z

    def ddim_step(self, out: torch.Tensor, step: int, x: torch.Tensor, eta: float,
                  generator: torch.Generator | None) -> torch.Tensor:
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0, eps = self.x0_eps(out.float(), x, i)
        a, a_prev = _extract(self.alphas_cumprod, i, x), _extract(self.alphas_cumprod_prev, i, x)
        # DDIM eq. 16: eta = 1 gives the DDPM posterior variance, eta = 0 a deterministic map
        sigma = eta * ((1 - a_prev) / (1 - a)).sqrt() * (1 - a / a_prev).sqrt()
        z = _randn(x.shape, generator, x.device)
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        return x + (step > 0) * sigma * z

    def invert_model_timesteps(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """Inversion evaluates the network at the previous (less noisy) step: x is at that noise level."""
        prev = torch.clamp(torch.full((x.shape[0],), step, device=x.device, dtype=torch.long) - 1, min=0)
        return self.timestep_map.to(x.device)[prev]

    def ddim_invert_step(self, out: torch.Tensor, step: int, x: torch.Tensor) -> torch.Tensor:
        """The eta = 0 DDIM map run backwards, x_{t-1} -> x_t (unCLIP section 3: the latent that reproduces
        an image under its embedding, used for text diffs); `out` is the network at invert_model_timesteps."""
        i = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        a_prev = _extract(self.alphas_cumprod_prev, i, x)
        prev = torch.clamp(i - 1, min=0)
        eps_from = self.x0_eps(out.float(), x, prev)[1]
        x0_hat = (x - (1 - a_prev).sqrt() * eps_from) / a_prev.sqrt()
        a = _extract(self.alphas_cumprod, i, x)
        return a.sqrt() * x0_hat + (1 - a).sqrt() * eps_from


def guided(model_fn: ModelFn, cond: dict, scale: float, text_scale: float | None = None) -> DenoiseFn:
    """Classifier-free guidance: out = u + scale (c - u), the conditional and unconditional rows in one
    batched forward. At scale 1 that is c: the conditional forward alone, at half the cost.

    With `text_scale` (for a model whose `drop` takes {"image": mask, "text": mask}, as the decoder's), the caption
    is guided apart from the image embedding, as InstructPix2Pix guides its two conditions (Brooks et al. 2023):
    out = u + scale (c_image - u) + text_scale (c - c_image), where c_image drops the caption only: three rows per
    forward. `text_scale` equal to `scale` is plain guidance."""
    if text_scale is not None and text_scale != scale:
        return _guided_apart(model_fn, cond, scale, text_scale)
    if scale == 1:
        return conditional(model_fn, cond)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
        both = model_fn(torch.cat([x, x]), torch.cat([t, t]), {k: torch.cat([v, v]) for k, v in cond.items()}, drop)
        c, u = both.float().chunk(2)
        return u + scale * (c - u)

    return denoise


def _guided_apart(model_fn: ModelFn, cond: dict, scale: float, text_scale: float) -> DenoiseFn:
    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        zeros, ones = (torch.full((x.shape[0],), v, dtype=torch.bool, device=x.device) for v in (False, True))
        drop = {"image": torch.cat([zeros, zeros, ones]), "text": torch.cat([zeros, ones, ones])}
        rows = model_fn(torch.cat([x, x, x]), torch.cat([t, t, t]), {k: torch.cat([v, v, v]) for k, v in cond.items()},
                        drop)
        c, c_image, u = rows.float().chunk(3)
        return u + scale * (c_image - u) + text_scale * (c - c_image)

    return denoise


def conditional(model_fn: ModelFn, cond: dict) -> DenoiseFn:
    """The network under its condition, no guidance (one forward)."""
    return lambda x, t: model_fn(x, t, cond, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (original, 0..T-1) timesteps, as in the Transformer and ADM. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))
