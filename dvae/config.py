"""dVAE configs: the architecture (`DVAEConfig`) and the training objective (`DVAELossConfig`).

They live in the dvae package so that it stands on its own (no import of dalle_ar); dalle_ar.config
imports them for its presets and CLI. `ConfigError` lives here for the same reason: dVAE configs raise
it, and dalle_ar uses the same class for all of its config errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args


Reconstruction = Literal["logit_laplace", "mse", "l1"]


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the file/field and the fix."""


@dataclass
class DVAEConfig:
    """Gumbel-softmax dVAE (DALL-E section 2.1). Layout follows OpenAI's released dVAE."""

    image_size: int = 64
    num_tokens: int = 512          # codebook size K (paper: 8192)
    group_count: int = 4           # resolution halves between groups: grid = image_size / 2**(group_count-1)
    n_hid: int = 32                # width of the first group; group g has n_hid * 2**(g-1) channels (paper: 256)
    n_blk_per_group: int = 1       # paper: 2
    n_init: int = 128              # decoder width after the 1x1 conv from the K one-hot channels
    straight_through: bool = False  # hard one-hot forward, soft gradients (ablation; paper uses soft)

    def __post_init__(self):
        if self.group_count < 1 or self.num_tokens < 2:
            raise ConfigError(f"dvae: group_count {self.group_count} must be >= 1 and num_tokens {self.num_tokens} >= 2")
        if self.image_size % self.downsample:
            lo = self.image_size // self.downsample * self.downsample
            raise ConfigError(f"image_size {self.image_size} is not divisible by the downsampling factor "
                              f"{self.downsample} (the dVAE's 2**(group_count-1), group_count {self.group_count}); use --image_size "
                              f"{lo or self.downsample} or {lo + self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass
class DVAELossConfig:
    """dVAE objective and schedules (paper appendix A.2). Defaults are the paper's; every anneal length
    is for a `reference_steps`-update run and is scaled by steps / reference_steps (0 = no scaling)."""

    reconstruction: Reconstruction = "logit_laplace"  # logit_laplace (paper); mse, l1 for comparison
    # Lower bound on the logit-Laplace scale b (b = exp(ln b) + min_scale; 0 = none, the paper). An
    # experiment knob: on flat synthetic images b -> 0 and the codebook collapses (README, "The dVAE").
    min_scale: float = 0.0
    kl_weight: float = 6.6           # beta; the loss is divided by H*W*3, so KL summed over the grid weighs beta/192 (8x downsampling)
    kl_anneal_steps: int = 5000      # beta: cosine 0 -> kl_weight over these updates
    temperature_start: float = 1.0
    temperature_end: float = 1 / 16
    temperature_anneal_steps: int = 150_000  # tau: cosine start -> end over these updates
    lr_anneal_steps: int = 1_200_000  # learning rate: cosine lr -> lr * min_lr_ratio, then constant
    reference_steps: int = 3_000_000  # the paper's run length the anneal lengths are written for
    # Codebook entropy penalty (MAGVIT-v2, Yu et al. 2023, sec. 3.1; not in the paper, off by default):
    # adds entropy_weight * (entropy_cell_weight * mean H(q(z|x)) - H(batch-mean q)): confident per-cell
    # codes but many codes used per batch. Small models on short runs otherwise use few codes.
    entropy_weight: float = 0.0
    entropy_cell_weight: float = 1.0
    # Train on random crops of this side (a multiple of the grid cell, 0 = whole images; not in the paper). The
    # dVAE is fully convolutional and each code sees a few cells around it, so crops teach the same codes at
    # (crop / image_size)^2 of the convolutions: on the 64 px shapes world, 3,000 steps on 32 px crops pass the
    # reconstruction check 89% of the time, 1,000 whole-image steps 37%, in ~1.7x the time (README, "The dVAE").
    crop_size: int = 0

    RECONSTRUCTIONS: ClassVar[tuple[str, ...]] = get_args(Reconstruction)

    def __post_init__(self):
        if self.reconstruction not in self.RECONSTRUCTIONS:
            raise ConfigError(f"--reconstruction {self.reconstruction}: use one of {', '.join(self.RECONSTRUCTIONS)}")
        if self.crop_size < 0:
            raise ConfigError(f"--crop_size {self.crop_size}: use 0 (whole images) or a positive side in pixels")

    def check_model(self, model: DVAEConfig) -> None:
        """Raise if this objective cannot train `model` (a crop must hold whole grid cells and fit the image)."""
        crop, cell = self.crop_size, model.downsample
        if crop and (crop % cell or crop > model.image_size):
            fit = min(max(cell, crop // cell * cell), model.image_size)
            raise ConfigError(f"--crop_size {crop} must be a multiple of the grid cell ({cell} px) and at most "
                              f"--image_size {model.image_size}; use --crop_size {fit}, or 0 for whole images")

    def scaled(self, steps: int) -> "DVAELossConfig":
        """Anneal lengths for a run of `steps` updates (at least 1 step each)."""
        if not self.reference_steps:
            return self
        f = steps / self.reference_steps
        return dataclasses.replace(self, kl_anneal_steps=max(1, round(self.kl_anneal_steps * f)),
                                   temperature_anneal_steps=max(1, round(self.temperature_anneal_steps * f)),
                                   lr_anneal_steps=max(1, round(self.lr_anneal_steps * f)), reference_steps=0)
