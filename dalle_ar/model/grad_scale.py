"""Per-resblock gradient scaling for fp16 training (DALL-E appendix D, figure 4).

One loss scale for the whole network is held down by the resblock whose gradients overflow first, while
the activation gradients of other resblocks -- in deep stacks they shrink by orders of magnitude from
one end to the other -- underflow to zero in fp16. Here every residual branch (the attention and the MLP
branch of each layer: 2 x depth "resblocks") back-propagates at its own scale s_i:

- forward, the residual stream (the identity path) stays in fp32; each branch reads a cast of it in the
  compute dtype and its output is cast back to fp32 before the add. So the identity-path gradient is
  fp32, as in the paper;
- backward, the branch's output gradient g (fp32, carrying the global loss scale S that DeepSpeed
  multiplied the loss by) is multiplied by s_i / S and cast to fp16: the branch runs at scale s_i;
- the branch's input gradient is cast to fp32, multiplied by S / s_i, and its non-finite values are set to
  zero (the paper's "filter"): an overflow in this branch does not reach the branches below it and so
  does not lower their scales;
- the branch's parameter gradients (scale s_i) are multiplied by S / s_i as they are produced (a tensor
  hook, before DeepSpeed accumulates or reduces them), so DeepSpeed's fp16 optimizer sees ordinary
  loss-scaled gradients: it unscales them in fp32, and its global scale now answers only to parameter
  gradients;
- a step in which any branch saw a non-finite gradient is skipped: the embedding gradients (computed
  last) are set to NaN, which DeepSpeed's overflow check sees. After every optimizer step each s_i is
  halved if its branch overflowed, doubled after `window` clean steps in a row.

All scales are powers of two and every rescale happens in fp32, so it is exact: an fp32 model's gradients
are the same bit for bit at any scales (tests/test_grad_scale.py). No host sync is added (the flags and
scales live on the device). `model/parallelize.py` (`apply_resblock_grad_scaling`) puts the scaler on a
DalleTransformer from outside, as forward hooks around each branch.
"""

from __future__ import annotations

import torch


class _Enter(torch.autograd.Function):
    """Residual stream (fp32) -> branch input (compute dtype). Backward: the branch's input gradient
    (scale s_i) -> fp32 at scale S, non-finite values zeroed and flagged."""

    @staticmethod
    def forward(ctx, x, scaler: "ResblockGradScaler", i: int, dtype: torch.dtype):
        ctx.scaler, ctx.i, ctx.in_dtype = scaler, i, x.dtype
        return x.to(dtype)

    @staticmethod
    def backward(ctx, g):
        s = ctx.scaler
        g = g.float() * (s.loss_scale / s.scales[ctx.i])
        finite = torch.isfinite(g)
        s.overflow[ctx.i] |= ~finite.all()
        return torch.where(finite, g, 0.0).to(ctx.in_dtype), None, None, None


class _Exit(torch.autograd.Function):
    """Branch output (compute dtype) -> fp32 residual add. Backward: the residual gradient (scale S) ->
    the branch's output gradient at scale s_i, in the compute dtype."""

    @staticmethod
    def forward(ctx, y, scaler: "ResblockGradScaler", i: int):
        ctx.scaler, ctx.i, ctx.out_dtype = scaler, i, y.dtype
        return y.float()

    @staticmethod
    def backward(ctx, g):
        s = ctx.scaler
        return (g * (s.scales[ctx.i] / s.loss_scale)).to(ctx.out_dtype), None, None


class ResblockGradScaler:
    """The per-branch scales s_i (fp32), their overflow flags and clean-step counters, on the device. Not
    an nn.Module on purpose: DeepSpeed's `module.half()` would cast the scales to fp16 (2**16 is inf there)
    and they are no weights to export; `checkpoint_state` carries them for resume."""

    def __init__(self, branches: int, init_scale: float = 2.0 ** 16, window: int = 1000,
                 min_scale: float = 2.0 ** -16, max_scale: float = 2.0 ** 32):
        self.window, self.min_scale, self.max_scale = window, min_scale, max_scale
        self.scales = torch.full((branches,), float(init_scale))
        self.clean = torch.zeros(branches, dtype=torch.long)
        self.overflow = torch.zeros(branches, dtype=torch.bool)
        self.loss_scale = torch.ones(())

    def to(self, device) -> "ResblockGradScaler":
        for name in ("scales", "clean", "overflow", "loss_scale"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- the autograd pieces -------------------------------------------------------------------
    def enter(self, x: torch.Tensor, i: int, dtype: torch.dtype) -> torch.Tensor:
        return _Enter.apply(x, self, i, dtype)

    def exit(self, y: torch.Tensor, i: int) -> torch.Tensor:
        return _Exit.apply(y, self, i)

    def hook_branch_params(self, params, i: int) -> None:
        """Parameter gradients of branch i: scale s_i -> S (exact: powers of two); flag non-finite ones."""
        def unscale(g, i=i):
            self.overflow[i] |= ~torch.isfinite(g).all()
            return (g.float() * (self.loss_scale / self.scales[i])).to(g.dtype)
        for p in params:
            p.register_hook(unscale)

    def hook_skip_params(self, params) -> None:
        """Parameters whose gradients are computed after every branch's (the embeddings): NaN when any
        branch overflowed, so the optimizer's overflow check skips the step."""
        def poison(g):
            return g.masked_fill(self.overflow.any(), float("nan"))
        for p in params:
            p.register_hook(poison)

    # -- the dynamic schedule ------------------------------------------------------------------
    def set_loss_scale(self, value: float) -> None:
        """The global scale the loss is multiplied by before backward (DeepSpeed fp16; 1 otherwise)."""
        self.loss_scale.fill_(float(value))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step (all its micro-batches): halve the scales of branches that overflowed,
        double those clean for `window` steps, clear the flags."""
        self.clean.copy_(torch.where(self.overflow, 0, self.clean + 1))
        grow = self.clean >= self.window
        factor = torch.where(self.overflow, 0.5, torch.where(grow, 2.0, 1.0))
        self.scales.copy_((self.scales * factor).clamp(self.min_scale, self.max_scale))
        self.clean.masked_fill_(grow, 0)
        self.overflow.zero_()

    def stats(self) -> dict[str, float]:
        """For logging (syncs): log2 of the smallest / largest scale."""
        log2 = self.scales.log2()
        return {"resblock_scale_log2_min": log2.min().item(), "resblock_scale_log2_max": log2.max().item()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {"scales": self.scales.cpu(), "clean": self.clean.cpu()}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.scales.copy_(state["scales"])
        self.clean.copy_(state["clean"])
        self.overflow.zero_()
