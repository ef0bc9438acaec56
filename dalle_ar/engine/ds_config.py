"""What DeepSpeed is told: the compute dtype (whether this machine runs fp16) and the resolved
`ds_config` dict, the run's JSON with the TrainConfig values (batch, accumulation, ZeRO stage, clipping,
precision, offload) on top. `TrainConfig` has validated the values; what is checked here depends on the
machine (fp16 support) or on the JSON (a global batch size, sections the engine owns)."""

from __future__ import annotations

import copy

import torch

from dalle_ar.config import ConfigError, TrainConfig
from dalle_ar.engine.distributed import world_size


def fp16_supported() -> bool:
    """Whether DeepSpeed runs fp16 here: CUDA, or a CPU its accelerator reports fp16 support for."""
    if torch.cuda.is_available():
        return True
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """auto = bf16 on CUDA, fp32 elsewhere; fp16 (dynamic loss scaling) where DeepSpeed supports it."""
    if cfg.precision == "fp16" and not fp16_supported():
        raise ConfigError("--precision fp16 needs a CUDA GPU (DeepSpeed's loss-scaled fp16 optimizer; this CPU has no "
                          "fp16 support); use fp32 or bf16 on CPU")
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]


def build_ds_config(cfg: TrainConfig, world: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """ds_config.json (`cfg.ds_json`, read once), with the run's batch, accumulation, ZeRO stage,
    clipping, precision (`dtype`, default `compute_dtype(cfg)`) and offload on top (TrainConfig took the
    JSON's values for the first four unless a flag set them). A global `train_batch_size` in the JSON must
    equal micro-batch x accumulation x `world` (default: ranks now)."""
    ds = copy.deepcopy(cfg.ds_json)  # the run's config keeps the file's contents; this dict is DeepSpeed's
    world = world_size() if world is None else world
    total = ds.pop("train_batch_size", None)  # derived: micro * accumulation * world size
    if total not in (None, "auto"):
        derived = cfg.batch_size * cfg.grad_accum * world
        if not isinstance(total, int) or isinstance(total, bool) or total != derived:
            fix = (f"pass --grad_accum {total // (cfg.batch_size * world)}"
                   if isinstance(total, int) and total > 0 and total % (cfg.batch_size * world) == 0 else
                   "set --batch_size/--grad_accum to match it")
            raise ConfigError(f"{cfg.ds_config}: train_batch_size {total!r} != batch_size {cfg.batch_size} x grad_accum "
                              f"{cfg.grad_accum} x {world} rank(s) = {derived}; remove train_batch_size (it is derived) "
                              f"or {fix}")
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["gradient_clipping"] = cfg.grad_clip
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.zero_stage
    dtype = compute_dtype(cfg) if dtype is None else dtype
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    # fp16: dynamic loss scaling (loss_scale 0) unless the JSON pins its own settings
    ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                  "min_loss_scale": 1, **ds.get("fp16", {}), "enabled": dtype == torch.float16}
    if cfg.offload != "none":
        target = {"device": cfg.offload, "pin_memory": True, **({"nvme_path": cfg.nvme_path} if cfg.offload == "nvme" else {})}
        zero["offload_optimizer"] = dict(target)
        if cfg.zero_stage == 3:
            zero["offload_param"] = dict(target)
        ds["zero_force_ds_cpu_optimizer"] = False  # our client optimizer is torch AdamW
    ds["zero_allow_untested_optimizer"] = True  # our client optimizer is torch AdamW
    ds.setdefault("steps_per_print", 10 ** 9)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{cfg.ds_config}: remove the '{key}' section; the engine builds a torch AdamW with "
                              f"warmup+cosine from the run's --lr/--warmup_steps (DeepSpeed's FusedAdam needs a CUDA build)")
    return ds
