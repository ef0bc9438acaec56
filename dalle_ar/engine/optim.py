"""The client optimizer DeepSpeed gets: torch AdamW whose weight decay skips the parameters decay would only pull
towards zero, or (`--optimizer muon`) DeepSpeed's Muon on the model's hidden weight matrices with AdamW on the rest."""

from __future__ import annotations

import functools

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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (`cfg.lr`, betas, decoupled weight decay), or Muon + AdamW in one optimizer: Muon (`cfg.muon_lr`,
    Nesterov momentum `cfg.muon_momentum`, 5 Newton-Schulz steps) on `muon_params(model)`, AdamW on the rest.
    DeepSpeed's ZeRO 1/2 recognises its `MuonWithAuxAdam` by the `use_muon` tag on each parameter and
    orthogonalises the full matrix where the gradient is reduced, before it is partitioned."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, fused=cfg.fused_adamw)
    hidden = muon_params(model, cfg.zero_stage)
    if not torch.cuda.is_available():  # on CUDA DeepSpeed's own, in fp16
        newton_schulz_in_fp32()
    if cfg.zero_stage in (1, 2):
        zero_muon_keeps_every_momentum()
    compile_muon_update(cfg.muon_compile)
    ids = {id(p) for p in hidden}
    for p in model.parameters():
        p.use_muon = id(p) in ids
    groups = [dict(params=hidden, use_muon=True, lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                   weight_decay=cfg.weight_decay, ns_method=NEWTON_SCHULZ_METHOD)]
    groups += [dict(g, use_muon=False, lr=cfg.lr, betas=betas, eps=1e-8)
               for g in param_groups(model, cfg.weight_decay, exclude=ids) if g["params"]]
    return _muon_with_kernels()(groups)


# Written into every Muon checkpoint: its matrices are in the model's order (`_muon_with_kernels`). A checkpoint without
# it holds DeepSpeed's shape-sorted order, in which this version would load its optimizer state onto the wrong matrices.
MUON_ORDER = "model"

QUINTIC = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s (and DeepSpeed's) Newton-Schulz coefficients

# DeepSpeed's `ns_method`: the iteration carried on the Gram matrix of a rectangular matrix's short side (its default;
# fewer FLOPs), in fp16 on CUDA and in fp32 on every CPU (`gram_newton_schulz`): over the demo transformer's hidden
# matrices, one thread of a 2-core AVX2 EPYC, 0.23 s a step against 0.37 for the standard iteration
# (bench/results/newton_schulz_cpu.json).
NEWTON_SCHULZ_METHOD = "gram"


def _wide_fp32(g: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """`g` in fp32, transposed to wide if it is tall (whether it was), scaled to Frobenius norm 1, which bounds the
    spectral norm: every singular value <= 1, where the iteration converges."""
    tall = g.size(-2) > g.size(-1)
    x = g.float().mT if tall else g.float()
    return x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7), tall


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """DeepSpeed's `zeropower_via_newtonschulz5` computed in fp32: Jordan et al.'s quintic Newton-Schulz iteration,
    which moves every singular value of the matrix `g` (or of each matrix of a batch) near 1."""
    a, b, c = QUINTIC
    x, tall = _wide_fp32(g)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def gram_newton_schulz(g: torch.Tensor, steps: int = 5, restart: int = 2) -> torch.Tensor:
    """`newton_schulz` carried on the Gram matrix, in fp32 (Dao's Gram Newton-Schulz, DeepSpeed's "gram" method).
    Each quintic step multiplies the wide matrix x by p(G) = a + b G + c G^2 of its Gram matrix G = x x^T, so every
    iterate is a product Q of such polynomials times the normalised input, and the step updates G = p G p: square
    matrices the size of the short side. x is formed only at `restart` (which sheds the rounding the products
    collect) and at the end. For a (256, 1024) matrix that is 56 m^3 FLOPs against 90 m^3 (m = 256); a square
    matrix gains nothing and takes `newton_schulz`."""
    if g.size(-2) == g.size(-1):
        return newton_schulz(g, steps)
    a, b, c = QUINTIC
    x, tall = _wide_fp32(g)
    gram, q = x @ x.mT, None
    for i in range(steps):
        if i == restart and q is not None:
            x = q @ x
            gram, q = x @ x.mT, None
        p = b * gram + c * gram @ gram
        p.diagonal(dim1=-2, dim2=-1).add_(a)
        q = p if q is None else p @ q
        if i + 1 < steps and i + 1 != restart:
            gram = p @ gram @ p
    x = q @ x
    return x.mT if tall else x


def newton_schulz_in_fp32() -> None:
    """Make DeepSpeed's Muon (deepspeed 0.19.7) orthogonalise in fp32 (`newton_schulz`, `gram_newton_schulz`), in
    this process: what every CPU runs. DeepSpeed runs the standard iteration in bf16 wherever its accelerator says bf16
    is supported, which its CPU accelerator always says, and the Gram one in fp16 wherever it says fp16 is. A CPU
    without bf16 matrix instructions multiplies bf16 matrices many times slower than fp32 (the demo's transformer,
    one process of batch 32 on one thread of a 2-core AVX2 EPYC: 13 s a step against 1.4); on one with them (AMX),
    the bf16 iteration was faster but its demo models picked 58-62 of 64 held-out prompts right over three seeds
    against 63-64 in fp32, tying on 128 development prompts (bench/results/demo_newton_schulz_xeon_cpu.json), so a
    run's numbers do not depend on which instructions its CPU has. Every Muon path (ZeRO 0, 1 and 2, and the kernels
    `MuonWithKernels` steps) calls DeepSpeed's `muon_update`, which looks the iteration up in its module."""
    from deepspeed.runtime.zero.muon import original_muon

    original_muon.zeropower_via_newtonschulz5 = newton_schulz
    original_muon.zeropower_via_gram_newtonschulz = gram_newton_schulz


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process with dynamic shapes (every engine of a process shares its graphs)."""
    return torch.compile(fn, dynamic=True)


def compile_muon_update(compiled: bool) -> None:
    """Make DeepSpeed's Muon (deepspeed 0.19.7) run `muon_update` compiled or uncompiled (`--no-muon_compile`), in
    this process. Compiled, it takes dynamic shapes: one graph per kind of matrix (tall or wide, and the size past
    which Inductor's CPU reductions change), where DeepSpeed's own wrapper compiles one per shape and runs eagerly past
    torch.compile's recompile limit. The modules that step Muon parameters call the one chosen; DeepSpeed's own stays
    in `original_muon`."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    wrapped = original_muon.muon_update
    # the function torch.compile wraps; DeepSpeed with its compiler off exposes the plain function
    fn = getattr(wrapped, "_torchdynamo_orig_callable", wrapped)
    if compiled:
        fn = _compiled(fn)
    for module in (muon_optimizer, stage_1_and_2, stage3):
        module.muon_update = fn


def zero_muon_keeps_every_momentum() -> None:
    """Make deepspeed 0.19.7's ZeRO-1/2 Muon keep the momentum of every matrix of a rank's partition, in this process.
    When it orthogonalises a partition's matrices it stages the step's momentum (a copy of the committed one, so that
    a step skipped for overflow leaves it untouched) once per matrix, so each copy wipes what the matrices before it
    wrote and only the last one keeps its momentum; the others step as with momentum 0. Here the copy is made once
    per pass over the partition, and each matrix's momentum then lasts to the commit. A matrix's update is then
    stage 0's (Muon on the averaged gradient; tests/test_engine.py). Reproduced for upstream in
    docs/upstream/deepspeed.md."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer as Zero

    if getattr(Zero, "_stages_momentum_once", False):
        return
    stage = Zero._muon_staging_momentum

    def staged_once(self, flatten_copy, param_group_idx):
        pass_ = getattr(self, "_muon_staged_this_pass", None)
        if pass_ is None:  # outside a pass: stage as deepspeed does, never a copy kept from an earlier step
            return stage(self, flatten_copy, param_group_idx)
        if param_group_idx not in pass_:
            pass_[param_group_idx] = stage(self, flatten_copy, param_group_idx)
        return pass_[param_group_idx]

    flat_partition = Zero.get_flat_partition  # the one pass over a partition (its unpadded variant is called from it)

    def one_pass(self, *args, **kwargs):
        self._muon_staged_this_pass = {}
        try:
            return flat_partition(self, *args, **kwargs)
        finally:
            self._muon_staged_this_pass = None

    Zero._muon_staging_momentum = staged_once
    Zero.get_flat_partition = one_pass
    Zero._stages_momentum_once = True


def deepspeed_clips_zero_dim_gradients() -> None:
    """Make deepspeed 0.19.7's gradient clipping at ZeRO stage 0 in fp32 take 0-dim parameters (open_clip's
    `logit_scale`), in this process. Its `clip_grad_norm_` multiplies every gradient in place by a 1-element tensor,
    which a 0-dim gradient cannot take ("output with shape [] doesn't match the broadcast shape [1]"), so
    `train_clip.py --zero_stage 0` failed at its first step. The engine's `clip_grad_norm_` (both its callers) now
    sees a 0-dim parameter's gradient as a 1-element view of the same memory; everything else it reads of the
    parameter is the parameter's own. Reproduced for upstream in docs/upstream/deepspeed.md."""
    from deepspeed.runtime import engine

    if getattr(engine.clip_grad_norm_, "_takes_zero_dim_gradients", False):
        return
    clip = engine.clip_grad_norm_

    def clip_grad_norm_(parameters, *args, **kwargs):
        parameters = [parameters] if isinstance(parameters, torch.Tensor) else parameters
        return clip([_OneElementGrad(p) if p.grad is not None and p.grad.dim() == 0 else p for p in parameters],
                    *args, **kwargs)

    clip_grad_norm_._takes_zero_dim_gradients = True
    engine.clip_grad_norm_ = clip_grad_norm_


class _OneElementGrad:
    """A 0-dim parameter as `clip_grad_norm_` sees it: its gradient viewed as one element."""

    def __init__(self, param: nn.Parameter):
        self._param, self.grad = param, param.grad.view(1)

    def __getattr__(self, name):
        return getattr(self._param, name)


def _muon_with_kernels() -> type[torch.optim.Optimizer]:
    """DeepSpeed's `MuonWithAuxAdam`, stepping conv kernels (out, in, k, k) itself as (out, in*k*k) matrices (Jordan
    et al.'s treatment of hidden convolutions). deepspeed 0.19.7's `muon_update` flattens a kernel's update but then
    broadcasts it against the 4-D gradient (an (out, in, out, in) tensor) and scales it by k/k instead of
    out/(in*k*k). Matrices take DeepSpeed's own step unchanged."""
    from deepspeed.runtime.zero.muon import muon_optimizer
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    class MuonWithKernels(MuonWithAuxAdam):
        def __init__(self, param_groups):
            # deepspeed 0.19.7's MuonWithAuxAdam sorts a Muon group's matrices by shape, largest first (the round robin
            # of Jordan et al.'s own distributed Muon). ZeRO 1/2 cut the flat group into equal runs of elements, each
            # rank orthogonalising the matrices of its run, and a matrix's Newton-Schulz time hardly depends on its
            # size: sorted, rank 0 of the demo's transformer got its four (1024, 256) matrices and three (768, 256),
            # rank 1 the other ten (20.7 s of Newton-Schulz per 100 steps against 13.3, the faster rank waiting).
            # The model's order, block by block, gives each rank whole blocks. Checkpoints record it (`MUON_ORDER`).
            order = [list(g["params"]) for g in param_groups]
            super().__init__(param_groups)
            for group, params in zip(self.param_groups, order):
                if group["use_muon"]:
                    group["params"] = params

        @torch.no_grad()
        def step(self, closure=None, step_id=None):
            kernels, matrices = [], {}
            for group in self.param_groups:
                if group["use_muon"] and any(p.dim() > 2 for p in group["params"]):
                    matrices[id(group)] = group["params"]
                    kernels += [(group, p) for p in group["params"] if p.dim() > 2]
                    group["params"] = [p for p in group["params"] if p.dim() <= 2]
            try:
                loss = super().step(closure, step_id)
            finally:
                for group in self.param_groups:
                    group["params"] = matrices.get(id(group), group["params"])
            for group, p in kernels:
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                # detached: the same memory, but not a view of a 4-D tensor, whose strides a compiled muon_update
                # would otherwise guard on (a graph per kernel size)
                update = muon_optimizer.muon_update(grad.view(len(p), -1).detach(),
                                                    state["momentum_buffer"].view(len(p), -1).detach(),
                                                    beta=group["momentum"], ns_method=group.get("ns_method", "gram"))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.view_as(p), alpha=-group["lr"])
            return loss

    return MuonWithKernels
