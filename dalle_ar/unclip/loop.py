"""The denoising loops of the unCLIP prior and decoder: call the network, hand its output to the scheduler
(`GaussianDiffusion`, pure arithmetic), repeat -- with the progress bar. As in diffusers, the loop belongs
to whoever holds the network (the models' `sample` / `invert` and `UnclipPipeline` call these), and the
scheduler never calls it.

Every step draws its noise from the caller's `torch.Generator` in a fixed order (the start noise, then one
draw per step, eta 0 included), so DDPM and DDIM share a stream and a seed gives the same samples.
"""

from __future__ import annotations

import torch

from dalle_ar.unclip.diffusion import DenoiseFn, GaussianDiffusion


def _progress(steps, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(steps, desc=desc, leave=False, disable=not progress)


@torch.no_grad()
def ddpm_sample(scheduler: GaussianDiffusion, denoise: DenoiseFn, shape, generator: torch.Generator | None = None,
                device="cpu", noise: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    x = scheduler.initial_noise(shape, generator, device, noise)
    for step in _progress(scheduler.timesteps(), progress, "ddpm"):
        x = scheduler.ddpm_step(denoise(x, scheduler.model_timesteps(step, x)), step, x, generator)
    return x


@torch.no_grad()
def ddim_sample(scheduler: GaussianDiffusion, denoise: DenoiseFn, shape, eta: float = 0.0,
                generator: torch.Generator | None = None, device="cpu", noise: torch.Tensor | None = None,
                progress: bool = False) -> torch.Tensor:
    x = scheduler.initial_noise(shape, generator, device, noise)
    for step in _progress(scheduler.timesteps(), progress, f"ddim(eta={eta:g})"):
        x = scheduler.ddim_step(denoise(x, scheduler.model_timesteps(step, x)), step, x, eta, generator)
    return x


def sample(scheduler: GaussianDiffusion, denoise: DenoiseFn, shape, *, sampler: str = "ddim", eta: float = 0.0,
           generator: torch.Generator | None = None, device="cpu", noise: torch.Tensor | None = None,
           progress: bool = False) -> torch.Tensor:
    if sampler == "ddpm":
        return ddpm_sample(scheduler, denoise, shape, generator, device, noise, progress)
    if sampler == "ddim":
        return ddim_sample(scheduler, denoise, shape, eta, generator, device, noise, progress)
    raise ValueError(f"sampler={sampler!r}: use ddpm or ddim")


@torch.no_grad()
def ddim_invert(scheduler: GaussianDiffusion, denoise: DenoiseFn, x0: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """x_0 -> x_T under the eta = 0 DDIM map (the noise that samples back to about x0)."""
    x = x0.float()
    for step in _progress(scheduler.timesteps(reverse=False), progress, "ddim-invert"):
        x = scheduler.ddim_invert_step(denoise(x, scheduler.invert_model_timesteps(step, x)), step, x)
    return x
