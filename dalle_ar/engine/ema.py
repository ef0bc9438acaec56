"""Exponential moving average of the weights: what the engine exports instead of the last step's weights
when `--ema_decay` is set (the dVAE's paper recipe, the unCLIP prior and decoder)."""

from __future__ import annotations

import torch
import torch.nn as nn


class EMA:
    """fp32 exponential moving average of a module's parameters (as this rank holds them: ZeRO 0-2).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early weights (random
    init) are forgotten quickly; short runs get a useful average too. `state_dict` is the averaged
    weights under the module's parameter names (the export, and the checkpoint's `ema`); the update
    count is checkpointed beside it (`ema_updates`)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        named = [(n, p) for n, p in module.named_parameters()]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[n])
