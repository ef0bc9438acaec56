"""The client optimizer DeepSpeed gets: torch AdamW whose weight decay skips the parameters decay would only pull
towards zero, or (`--optimizer muon`) DeepSpeed's Muon on the model's hidden weight matrices with AdamW on the rest."""

from __future__ import annotations

import torch
import torch.nn as nn

from dalle_ar.config import ConfigError, TrainConfig

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict]:
    """Weight decay on the weight matrices and conv kernels only: not on embeddings (token, position),
    norm gains, biases or other vectors (e.g. BOS), which decay would pull towards zero for no benefit.
    Parameters whose id is in `exclude` are left out (another optimizer trains them)."""
    skip = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in exclude]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in skip]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2 or id(p) in skip], "weight_decay": 0.0}]


def muon_params(model: nn.Module, zero_stage: int = 0) -> list[nn.Parameter]:
    """The matrices Muon trains: those the model names with `muon_params()` (its hidden layers; Muon is not
    meant for embeddings, output heads or vectors); conv kernels only at ZeRO stage 0."""
    if not hasattr(model, "muon_params"):
        raise ConfigError(f"--optimizer muon: {type(model).__name__} does not name the hidden matrices Muon should "
                          f"train (no muon_params()); use --optimizer adamw")
    params = [p for p in model.muon_params() if p.requires_grad]
    if not params or any(p.ndim < 2 for p in params):
        raise ValueError(f"{type(model).__name__}.muon_params() must name weight matrices")
    if zero_stage in (1, 2) and any(p.ndim > 2 for p in params):
        # DeepSpeed's ZeRO 1/2 Muon path (deepspeed 0.19.7) fails on conv kernels (an IndexError in
        # _get_flat_partition_unpadded); at stage 0 the optimizer below steps a kernel as a matrix itself
        raise ConfigError(f"--optimizer muon on {type(model).__name__}'s conv kernels needs --zero_stage 0: DeepSpeed's "
                          f"ZeRO {zero_stage} Muon orthogonalises matrices only (one process loses nothing at stage 0)")
    return params


# why --optimizer muon needs ZeRO stage 0 where native_bf16_matmul() is false (the trainer's error and `make demo`'s)
NO_BF16_FOR_MUON = ("DeepSpeed's ZeRO 1/2 Muon runs its Newton-Schulz iterations in bf16, and this CPU has no bf16 matrix "
                    "instructions (AVX512-BF16 or AMX); at --zero_stage 0 the optimizer orthogonalises in fp32")


def native_bf16_matmul() -> bool:
    """Whether this machine multiplies bf16 matrices in hardware: CUDA, or a CPU with AVX512-BF16 or AMX. Without
    them a CPU's bf16 matmul runs many times slower than its fp32 one."""
    if torch.cuda.is_available():
        return True
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (`cfg.lr`, betas, decoupled weight decay), or Muon + AdamW in one optimizer: Muon (`cfg.muon_lr`,
    Nesterov momentum `cfg.muon_momentum`, 5 Newton-Schulz steps) on `muon_params(model)`, AdamW on the rest.
    DeepSpeed's ZeRO 1/2 recognises its `MuonWithAuxAdam` by the `use_muon` tag on each parameter and
    orthogonalises the full matrix where the gradient is reduced, before it is partitioned."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas,
                                 fused=cfg.fused_adamw and torch.cuda.is_available())
    hidden = muon_params(model, cfg.zero_stage)
    if cfg.zero_stage in (1, 2) and not native_bf16_matmul():
        raise ConfigError(f"--optimizer muon at ZeRO {cfg.zero_stage}: {NO_BF16_FOR_MUON}; use --zero_stage 0")
    ids = {id(p) for p in hidden}
    for p in model.parameters():
        p.use_muon = id(p) in ids
    # ns_method "standard": Jordan et al.'s quintic iteration on the matrix itself, which ran the demo's transformer
    # faster on the 2-core CPU than DeepSpeed's default Gram variant (bench/results/transformer_muon_zen4_cpu.json)
    groups = [dict(params=hidden, use_muon=True, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                   weight_decay=cfg.weight_decay, ns_method="standard")]
    groups += [dict(g, use_muon=False, lr=cfg.lr, betas=betas, eps=1e-8)
               for g in param_groups(model, cfg.weight_decay, exclude=ids) if g["params"]]
    return _muon_with_kernels()(groups)


def orthogonalized(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's update direction for a matrix, in fp32: Jordan et al.'s quintic Newton-Schulz iteration (the
    coefficients DeepSpeed's `zeropower_via_newtonschulz5` uses), which moves every singular value near 1, scaled
    by sqrt(rows / cols) for a tall matrix as DeepSpeed's `muon_update` does."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = update.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the spectral norm: every singular value <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.T if tall else x
    return x.to(update.dtype) * max(1, update.size(0) / update.size(1)) ** 0.5


def _muon_with_kernels() -> type[torch.optim.Optimizer]:
    """DeepSpeed's `MuonWithAuxAdam`, stepping itself the Muon parameters DeepSpeed would step wrongly or slowly:
    - conv kernels (out, in, k, k), as (out, in*k*k) matrices (Jordan et al.'s treatment of hidden convolutions):
      deepspeed 0.19.7's `muon_update` flattens a kernel's update but then broadcasts it against the 4-D gradient
      (an (out, in, out, in) tensor) and scales it by k/k instead of out/(in*k*k);
    - on a CPU without bf16 matrix instructions, every matrix (ZeRO stage 0; `build_optimizer` refuses 1/2 there),
      orthogonalised in fp32 (`orthogonalized`) where DeepSpeed's bf16 iteration would run many times slower.
    Elsewhere matrices take DeepSpeed's own step unchanged, and what this class steps itself takes DeepSpeed's
    `muon_update` (Nesterov momentum, bf16 Newton-Schulz) on 2-D views."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
    from deepspeed.runtime.zero.muon.original_muon import muon_update

    native = native_bf16_matmul()

    def direction(grad: torch.Tensor, momentum: torch.Tensor, beta: float, ns_method: str) -> torch.Tensor:
        if native:
            return muon_update(grad, momentum, beta=beta, ns_method=ns_method)
        momentum.lerp_(grad, 1 - beta)
        return orthogonalized(grad.lerp(momentum, beta))  # Nesterov: the gradient blended towards the new momentum

    class MuonWithKernels(MuonWithAuxAdam):
        @torch.no_grad()
        def step(self, closure=None, step_id=None):
            own, kept = [], {}
            for group in self.param_groups:
                mine = {id(p) for p in group["params"] if p.dim() > 2 or (p.dim() == 2 and not native)}
                if group["use_muon"] and mine:
                    kept[id(group)] = group["params"]
                    own += [(group, p) for p in group["params"] if id(p) in mine]
                    group["params"] = [p for p in group["params"] if id(p) not in mine]
            try:
                loss = super().step(closure, step_id)
            finally:
                for group in self.param_groups:
                    group["params"] = kept.get(id(group), group["params"])
            for group, p in own:
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                update = direction(grad.view(len(p), -1), state["momentum_buffer"].view(len(p), -1),
                                   group["momentum"], group.get("ns_method", "gram"))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-group["lr"])
            return loss

    return MuonWithKernels
