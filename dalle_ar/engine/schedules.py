"""Learning-rate schedules, as factors of the base LR that `LambdaLR` applies: linear warmup, then cosine
decay (the default, and the dVAE's paper schedule) or halving on each loss plateau (the paper's transformer).
`TrainConfig` has validated `lr_schedule` already."""

from __future__ import annotations

import math
from typing import Callable

from dalle_ar.config import TrainConfig


def warmup(cfg: TrainConfig, step: int) -> float:
    """Linear warmup factor: (step + 1) / (warmup_steps + 1), then 1."""
    return min(1.0, (step + 1) / (cfg.warmup_steps + 1))


def warmup_cosine(cfg: TrainConfig, decay_steps: int | None = None) -> Callable[[int], float]:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio over `decay_steps` (default: the rest of
    the run), constant after."""
    decay = (cfg.steps - cfg.warmup_steps) if decay_steps is None else decay_steps

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return warmup(cfg, step)
        t = min(1.0, (step - cfg.warmup_steps) / max(1, decay))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return factor


class PlateauHalving:
    """The DALL-E transformer's schedule (paper B.2): halve the learning rate each time the training loss
    plateaus, at most `max_halvings` times. A plateau: the smoothed loss (EMA 0.98, averaged over ranks)
    has not beaten its best by a relative `threshold` for `patience` steps."""

    def __init__(self, patience: int, threshold: float, max_halvings: int, smoothing: float = 0.98):
        self.patience, self.threshold, self.max_halvings, self.smoothing = patience, threshold, max_halvings, smoothing
        self.halvings, self.best, self.since, self.avg = 0, math.inf, 0, None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "PlateauHalving | None":
        """The schedule's state when `lr_schedule` is plateau (checkpointed with the run), else None."""
        if cfg.lr_schedule != "plateau":
            return None
        return cls(cfg.plateau_patience, cfg.plateau_threshold, cfg.plateau_halvings)

    def observe(self, loss: float) -> None:
        self.avg = loss if self.avg is None else self.smoothing * self.avg + (1 - self.smoothing) * loss
        if self.avg < self.best * (1 - self.threshold):
            self.best, self.since = self.avg, 0
            return
        self.since += 1
        if self.since >= self.patience and self.halvings < self.max_halvings:
            self.halvings, self.since, self.best = self.halvings + 1, 0, self.avg

    @property
    def factor(self) -> float:
        return 0.5 ** self.halvings

    def state_dict(self) -> dict:
        return {"halvings": self.halvings, "best": self.best, "since": self.since, "avg": self.avg}

    def load_state_dict(self, state: dict) -> None:
        self.halvings, self.best, self.since, self.avg = state["halvings"], state["best"], state["since"], state["avg"]


def lr_factor(cfg: TrainConfig, plateau: PlateauHalving | None, decay_steps: int | None) -> Callable[[int], float]:
    if cfg.lr_schedule == "plateau":
        return lambda step: warmup(cfg, step) * plateau.factor
    return warmup_cosine(cfg, decay_steps)
