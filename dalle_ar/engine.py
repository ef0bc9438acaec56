"""The one training engine: every trainer (dVAE, transformer, CLIP) runs through `Trainer`.

It owns everything parallelism- and bookkeeping-related, so model code never imports DeepSpeed:
`deepspeed.initialize` from `ds_config.json` (+ the run's overrides), a torch AdamW client optimizer,
warmup + cosine LR, gradient accumulation, checkpoint save / resume (all ranks), export of
consolidated fp32 weights to `.safetensors` + `config.json`, and logging to tqdm and wandb (rank 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from dalle_ar.checkpoint import save_pretrained
from dalle_ar.config import ConfigError, TrainConfig, load_json, save_json
from dalle_ar.model import DalleTransformer
from dalle_ar.model.parallelize import apply_activation_checkpointing, apply_resblock_grad_scaling

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, int], "tuple[torch.Tensor, dict]"]


# ----------------------------------------------------------------------------------------------
# Distributed setup
# ----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed, also for a plain `python script.py`.

    Launchers (deepspeed, torchrun, srun via mpirun) set RANK/WORLD_SIZE; without them DeepSpeed would
    try MPI discovery and fail, so a single process gets rank 0 of 1 on a free local port."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        # CPU runs are tests and demos: gloo all-reduce is enough, skip JIT-building the shm comm op.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def mean_over_ranks(value: float, device) -> float:
    if not torch.distributed.is_initialized() or world_size() == 1:
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / world_size()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def fp16_supported() -> bool:
    """Whether DeepSpeed runs fp16 here: CUDA, or a CPU its accelerator reports fp16 support for."""
    if torch.cuda.is_available():
        return True
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """auto = bf16 on CUDA, fp32 elsewhere; fp16 (dynamic loss scaling) where DeepSpeed supports it."""
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r}: use one of {', '.join(PRECISIONS)}")
    if cfg.precision == "fp16" and not fp16_supported():
        raise ConfigError("--precision fp16 needs a CUDA GPU (DeepSpeed's loss-scaled fp16 optimizer; this CPU has no "
                          "fp16 support); use fp32 or bf16 on CPU")
    if cfg.resblock_grad_scaling and cfg.precision != "fp16":
        raise ConfigError(f"--resblock_grad_scaling is for --precision fp16 (got {cfg.precision}): bf16 and fp32 have "
                          f"fp32's exponent range and need no gradient scaling; drop the flag or pass --precision fp16")
    if cfg.precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]


OFFLOADS = ("none", "cpu", "nvme")


def build_ds_config(cfg: TrainConfig, world: int | None = None) -> dict:
    """ds_config.json, with the run's batch, accumulation, ZeRO stage, clipping, precision and offload on
    top (TrainConfig took the JSON's values for the first four unless a flag set them). A global
    `train_batch_size` in the JSON must equal micro-batch x accumulation x `world` (default: ranks now)."""
    ds = load_json(cfg.ds_config)
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
    dtype = compute_dtype(cfg)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    # fp16: dynamic loss scaling (loss_scale 0) unless the JSON pins its own settings
    ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                  "min_loss_scale": 1, **ds.get("fp16", {}), "enabled": dtype == torch.float16}
    if cfg.offload not in OFFLOADS:
        raise ConfigError(f"offload={cfg.offload!r}: use one of {', '.join(OFFLOADS)}")
    if cfg.offload != "none":
        if cfg.zero_stage == 0:
            raise ConfigError("--offload needs ZeRO (--zero_stage 1, 2 or 3)")
        if cfg.offload == "nvme" and not cfg.nvme_path:
            raise ConfigError("--offload nvme needs --nvme_path /local/fast/disk")
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
    if cfg.lr_schedule == "cosine":
        return warmup_cosine(cfg, decay_steps)
    if cfg.lr_schedule == "plateau":
        return lambda step: warmup(cfg, step) * plateau.factor
    raise ConfigError(f"lr_schedule={cfg.lr_schedule!r}: use cosine or plateau")


NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices and conv kernels only: not on embeddings (token, position),
    norm gains, biases or other vectors (e.g. BOS), which decay would pull towards zero for no benefit."""
    skip = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in skip]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2 or id(p) in skip], "weight_decay": 0.0}]


def to_device(batch, device, dtype: torch.dtype):
    """Move tensors to the device; floating tensors take the engine's compute dtype."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, dtype=dtype if batch.is_floating_point() else None, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    return batch


class EMA:
    """fp32 exponential moving average of a module's parameters (as this rank holds them: ZeRO 0-2).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so early weights (random
    init) are forgotten quickly; short runs get a useful average too."""

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

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        for n, t in zip(self.names, self.shadow):
            t.copy_(state[n])
        self.updates = updates


def rng_state() -> dict:
    """Every random stream a training step may draw from (dropout, caption dropout, augmentation)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def any_rank(flag: bool, device) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree to skip a step or to stop."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


FAULT_ENV = "DALLE_AR_FAULT"


def fault_point(name: str) -> None:
    """Crash-test hook: with DALLE_AR_FAULT=<name> (e.g. `save:4`, `step:7`) this process SIGKILLs itself
    at that point, the way a preempted node or the OOM killer would (tests/test_crash.py)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class StopSignal:
    """SIGTERM / SIGINT (preemption, Ctrl-C) set a flag; the loop finishes its step, saves and exits."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, the default behaviour stays
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Stopped(SystemExit):
    """Raised by `Trainer.fit` after a SIGTERM/SIGINT: the checkpoint is saved; exit status 0."""


MIN_SEEN_FOR_SKIP_CHECK = 200  # a few bad samples at the start of a stream say little about the data

COMPLETE = "complete"  # marker written into a checkpoint directory once every rank has written its part


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

class Trainer:
    """Wraps a model in a DeepSpeed engine and runs a step-counted training loop.

    `loss_fn(module, batch, step) -> (loss, metrics)` is the only model-specific piece. `export_config`
    is written next to the exported weights so `<out>/export` is self-describing."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, name: str, export_config: dict,
                 extra_files: dict[str, str] | None = None, lr_decay_steps: int | None = None):
        setup_distributed()
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self.cfg, self.name = cfg, name
        self.export_config, self.extra_files = export_config, extra_files or {}
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.is_main = rank() == 0
        torch.manual_seed(cfg.seed)
        if cfg.ema_decay and cfg.zero_stage == 3:
            raise ConfigError("--ema_decay needs full parameters on every rank; use --zero_stage 0, 1 or 2 with it")
        ds_config = build_ds_config(cfg)
        self.plateau = (PlateauHalving(cfg.plateau_patience, cfg.plateau_threshold, cfg.plateau_halvings)
                        if cfg.lr_schedule == "plateau" else None)
        factor = lr_factor(cfg, self.plateau, lr_decay_steps)  # validates --lr_schedule before DeepSpeed starts
        if cfg.activation_checkpointing:  # recompute each block's activations in backward
            if not isinstance(model, DalleTransformer):
                raise ConfigError(f"--activation_checkpointing: {type(model).__name__} does not support it; drop the flag")
            apply_activation_checkpointing(model)
        self.grad_scaler = None
        if cfg.resblock_grad_scaling:  # fp16: a gradient scale per residual branch (paper appendix D)
            if not isinstance(model, DalleTransformer):
                raise ConfigError(f"--resblock_grad_scaling: {type(model).__name__} has no resblocks to scale; drop the flag")
            fp16 = ds_config["fp16"]  # the per-branch scales start and grow like DeepSpeed's global one
            self.grad_scaler = apply_resblock_grad_scaling(model, init_scale=2.0 ** fp16["initial_scale_power"],
                                                           window=fp16["loss_scale_window"])
        if cfg.compile:  # in place: the module keeps its parameter names, so checkpoints don't change
            model.compile()
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), fused=cfg.fused_adamw and torch.cuda.is_available())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, factor))
        self.device = self.engine.device
        if self.grad_scaler is not None:
            self.grad_scaler.to(self.device)
        self.ema = EMA(self.module, cfg.ema_decay) if cfg.ema_decay else None
        self.dtype = compute_dtype(cfg)
        self.step = 0
        self.consumed = 0      # micro-batches taken from the data stream (the data position)
        self.nonfinite = 0     # micro-batches skipped for a NaN/Inf loss
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(self.out / "train_config.json", asdict(cfg))
            save_json(self.out / "ds_config.resolved.json", ds_config)
            zero = ds_config["zero_optimization"]
            offload = {k: v.get("device") for k, v in zero.items() if k.startswith("offload_") and isinstance(v, dict)}
            print(f"{name}: DeepSpeed ZeRO-{zero['stage']}, micro-batch {cfg.batch_size} x accumulation {cfg.grad_accum} "
                  f"x {world_size()} ranks, {str(self.dtype).removeprefix('torch.')}, clip {cfg.grad_clip}"
                  f"{', offload ' + str(offload) if offload else ''} (from {cfg.ds_config} + flags; "
                  f"resolved: {self.out / 'ds_config.resolved.json'})", flush=True)
        if cfg.resume and self.complete_checkpoints():
            self.load()
        self._wandb = None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        """Save on all ranks, atomically: each rank writes its files into `step_N/`, rank 0 writes the
        consolidated weights to `step_N/export/` (config.json + model.safetensors, like `<out>/export`),
        marks the directory complete and only then points `latest` at it (temp file + rename). A crash at
        any point leaves the previous complete checkpoint as the one that resume picks."""
        tag = f"step_{self.step:08d}"
        state = {"step": self.step, "consumed": self.consumed, "nonfinite": self.nonfinite, "rng": rng_state()}
        if self.ema is not None:
            state["ema"], state["ema_updates"] = self.ema.state_dict(), self.ema.updates
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        if self.grad_scaler is not None:
            state["resblock_grad_scaler"] = self.grad_scaler.checkpoint_state()
        if self.is_main:
            (self.ckpt_dir / tag / COMPLETE).unlink(missing_ok=True)  # re-saving a tag after a resume
        barrier()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=state, save_latest=False)
        fault_point(f"save:{self.step}")
        barrier()
        if self.is_main:  # consolidated fp32 weights beside the shards: sampling loads them without DeepSpeed
            save_pretrained(self.consolidated_state_dict(tag), self.ckpt_dir / tag / "export", self.export_config,
                            self.extra_files)
            (self.ckpt_dir / tag / COMPLETE).write_text(json.dumps({"step": self.step, "world_size": world_size()}))
            tmp = self.ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.ckpt_dir / "latest")
            self._prune(keep=tag)
        barrier()
        return tag

    def complete_checkpoints(self) -> list[str]:
        """Tags of the complete checkpoints, oldest first: those with the marker, and the one `latest` names
        (written only after the marker here, and last by DeepSpeed, so also right for older checkpoints)."""
        tags = {p.parent.name for p in self.ckpt_dir.glob(f"step_*/{COMPLETE}")}
        latest = self.ckpt_dir / "latest"
        if latest.is_file() and (self.ckpt_dir / latest.read_text().strip()).is_dir():
            tags.add(latest.read_text().strip())
        return sorted(tags)

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep_checkpoints` complete checkpoints; drop older ones and crash leftovers."""
        complete = self.complete_checkpoints()
        doomed = set(complete[: max(0, len(complete) - self.cfg.keep_checkpoints)])
        doomed |= {p.name for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p.name not in complete}
        for name in doomed - {keep}:
            shutil.rmtree(self.ckpt_dir / name, ignore_errors=True)

    def load(self) -> None:
        """Resume from the newest complete checkpoint: weights, optimizer, LR schedule, RNG streams, EMA,
        plateau state and the data position."""
        tag = self.complete_checkpoints()[-1]
        path, state = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.ckpt_dir / tag}: could not load this checkpoint; delete it to resume from "
                               f"the one before, or pass --resume false to start over")
        self.step = int(state["step"])
        self.consumed = int(state.get("consumed", self.step * self.cfg.grad_accum))
        self.nonfinite = int(state.get("nonfinite", 0))
        self._resumed_rng = state["rng"]  # set in fit(), after the data stream is fast-forwarded (it may draw)
        if self.ema is not None:
            if "ema" not in state:
                raise ConfigError(f"{path}: checkpoint has no EMA weights but --ema_decay is set; resume without it")
            self.ema.load_state_dict(state["ema"], state["ema_updates"])
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
        if self.grad_scaler is not None and "resblock_grad_scaler" in state:
            self.grad_scaler.load_checkpoint_state(state["resblock_grad_scaler"])
        if self.is_main:
            log.info("resumed %s from %s at step %d", self.name, path, self.step)
            print(f"{self.name}: resumed from {self.ckpt_dir / tag} at step {self.step}", flush=True)

    def consolidated_state_dict(self, tag: str) -> dict[str, torch.Tensor]:
        """fp32 weights on rank 0: from the module (ZeRO-0) or gathered from the ZeRO shards (1-3);
        with --ema_decay, the EMA weights take the parameters' place."""
        if self.cfg.zero_stage == 0:
            state = {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.ckpt_dir), tag=tag)
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def export(self, tag: str) -> Path:
        out = self.out / "export"
        if self.is_main:
            save_pretrained(self.consolidated_state_dict(tag), out, self.export_config, self.extra_files)
        barrier()
        return out

    # -- logging -----------------------------------------------------------------------------
    def _init_wandb(self) -> None:
        if not self.is_main or self.cfg.wandb == "disabled":
            return
        import wandb

        self._wandb = wandb.init(mode=self.cfg.wandb, project=self.cfg.wandb_project, dir=str(self.out),
                                 name=f"{self.name}-{self.out.name}", resume="allow",
                                 config={"train": asdict(self.cfg), "model": self.export_config},
                                 settings=wandb.Settings(console="off", silent=True))

    def log(self, metrics: dict) -> None:
        """wandb (when on) and `<out>/metrics.jsonl` (always, rank 0): the loss curve without wandb."""
        if not self.is_main:
            return
        if self._wandb is not None:
            self._wandb.log(metrics, step=self.step)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}) + "\n")

    def log_image(self, key: str, path: str | Path) -> None:
        """Log a PNG already written to disk (sample or reconstruction grid)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=self.step)

    def micro_step(self, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's step for one micro-batch (an optimizer step at the accumulation
        boundary, where the per-resblock gradient scales are updated too)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if self.grad_scaler is not None:  # the scale DeepSpeed multiplies this loss by
            global_scale = self.engine.optimizer.loss_scale
            self.grad_scaler.set_loss_scale(global_scale)
        self.engine.backward(loss)
        fault_point(f"step:{self.step + 1}")
        self.engine.step()
        if boundary and self.grad_scaler is not None:
            # A branch overflowed: DeepSpeed skipped the step (the NaN the scaler put in the embedding
            # gradients) and lowered its scale, but that branch's own scale takes the blame; the global
            # one answers to parameter gradients only. (One sync; DeepSpeed's overflow check made one.)
            if self.grad_scaler.overflow.any():
                self.engine.optimizer.loss_scale = global_scale
            self.grad_scaler.update()

    def precision_stats(self) -> dict[str, float]:
        """fp16: DeepSpeed's loss scale and skipped steps, and the per-resblock scales when on."""
        if self.dtype != torch.float16:
            return {}
        stats = {"loss_scale": float(self.engine.optimizer.loss_scale), "overflow_skipped_steps": self.engine.skipped_steps}
        if self.grad_scaler is not None:
            stats.update(self.grad_scaler.stats())
        return stats

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, batches: Iterable, loss_fn: LossFn, items: Callable[[Any], int] = lambda b: len(b[0]),
            on_step: Callable[["Trainer"], None] | None = None, show: tuple[str, ...] = (), skips=None) -> Path:
        """Train until `cfg.steps` optimizer steps; returns the export directory. `show` names metrics
        from `loss_fn` that the progress bar displays next to loss, lr and samples/s; `skips` (a
        `shards.SkipCounter`) puts the bad-data count on the bar and in the end-of-run summary.

        - Resume: the data stream is fast-forwarded past the micro-batches already consumed, so a
          deterministic stream continues exactly where the checkpoint left it.
        - A NaN/Inf loss skips its micro-batch (no backward, no optimizer step; all ranks agree) and is
          counted; `max_nonfinite` in a row stop the run, pointing at the last good checkpoint.
        - SIGTERM/SIGINT: the current step finishes, a checkpoint is saved, and `Stopped` (exit 0) is raised."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        it = iter(batches)
        for _ in range(self.consumed):
            next(it)
        if getattr(self, "_resumed_rng", None) is not None:  # starting the loader draws a seed from torch's RNG
            set_rng_state(self._resumed_rng)
            self._resumed_rng = None
        self._init_wandb()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.is_main and cfg.progress))
        ema, t0, seen, in_a_row = None, time.perf_counter(), 0, 0
        with StopSignal() as stop:
            while self.step < cfg.steps:
                micro = 0
                while micro < cfg.grad_accum:
                    batch = to_device(next(it), self.device, self.dtype)
                    self.consumed += 1
                    loss, metrics = loss_fn(self.engine, batch, self.step)
                    value = loss.item()
                    if any_rank(not math.isfinite(value), self.device):
                        self.nonfinite, in_a_row = self.nonfinite + 1, in_a_row + 1
                        if in_a_row >= cfg.max_nonfinite:
                            raise FloatingPointError(
                                f"{self.name}: {in_a_row} non-finite losses in a row at step {self.step + 1}; lower "
                                f"--lr or check the data. Last good checkpoint: {self.ckpt_dir / 'latest'}")
                        log.warning("%s: loss is %s at step %d; micro-batch skipped (%d so far)",
                                    self.name, value, self.step + 1, self.nonfinite)
                        continue
                    in_a_row = 0
                    self.micro_step(loss)
                    seen += items(batch)
                    micro += 1
                if self.ema is not None:
                    self.ema.update()
                self.step += 1
                if self.plateau is not None:  # the same decision on every rank: the rank-averaged loss
                    self.plateau.observe(mean_over_ranks(value, self.device))
                ema = value if ema is None else 0.9 * ema + 0.1 * value
                dt = time.perf_counter() - t0
                rate = seen * world_size() / max(dt, 1e-9)
                bar.update(1)
                extra = {k: f"{metrics[k]:.3g}" for k in show if k in metrics}
                if skips is not None and skips.total:
                    extra["skipped"] = skips.total
                if self.nonfinite:
                    extra["nonfinite"] = self.nonfinite
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                samples_s=f"{rate:.1f}", **extra)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    data = {} if skips is None else {"data_seen": skips.seen, "data_skipped": skips.total}
                    data.update(self.precision_stats())
                    self.log({"loss": value, "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                              "nonfinite_skipped": self.nonfinite, **data, **metrics})
                    t0, seen = time.perf_counter(), 0
                    if skips is not None:  # too much bad data: stop early with the reasons (DataError)
                        skips.check(cfg.max_skip_fraction, min_seen=MIN_SEEN_FOR_SKIP_CHECK)
                if on_step is not None:
                    on_step(self)
                if any_rank(stop.received is not None, self.device):
                    bar.close()
                    tag = self.save()
                    msg = (f"{self.name}: stopped by {stop.received or 'a signal on another rank'} at step {self.step}; "
                           f"saved {self.ckpt_dir / tag}. Run the same command again to resume.")
                    if self.is_main:
                        print(msg, flush=True)
                    raise Stopped(0)
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
        bar.close()
        if skips is not None:
            skips.check(cfg.max_skip_fraction, min_seen=MIN_SEEN_FOR_SKIP_CHECK)
        final = f"step_{self.step:08d}"
        if final not in self.complete_checkpoints():
            self.save()
        export = self.export(final)
        if self.is_main and (skips is not None or self.nonfinite):
            print(f"{self.name}: done at step {self.step}; {self.nonfinite} non-finite micro-batches skipped"
                  + (f"; data: {skips.summary()}" if skips is not None else ""), flush=True)
        if self._wandb is not None:
            self._wandb.summary.update({"final_loss": ema, "steps": self.step})
            self._wandb.finish()
        return export
