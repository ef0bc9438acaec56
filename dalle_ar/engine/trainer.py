"""`Trainer`: the one training loop every trainer (dVAE, transformer, CLIP, unCLIP prior and decoder) runs.

It composes the engine's parts: DeepSpeed from the resolved `ds_config` (`ds_config.py`), a torch AdamW
client optimizer (`optim.py`) under a warmup + cosine or plateau LR (`schedules.py`), gradient
accumulation, non-finite-loss skipping, EMA (`ema.py`), checkpoints (`checkpointer.py`), clean stops on
SIGTERM/SIGINT (`signals.py`), and logging to tqdm, metrics.jsonl and wandb (`logger.py`)."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from dalle_ar import models
from dalle_ar.config import ConfigError, TrainConfig, save_json
from dalle_ar.engine import lock
from dalle_ar.engine.checkpointer import Checkpointer, StateFns
from dalle_ar.engine.distributed import any_rank, mean_over_ranks, rank, setup_distributed, world_size
from dalle_ar.engine.ds_config import build_ds_config, compute_dtype
from dalle_ar.engine.ema import EMA
from dalle_ar.engine.logger import RunLogger
from dalle_ar.engine.optim import MUON_ORDER, build_optimizer, deepspeed_clips_zero_dim_gradients
from dalle_ar.engine.rng import RNGStreams, rng_state, set_rng_state
from dalle_ar.engine.schedules import PlateauHalving, lr_factor
from dalle_ar.engine.signals import Interrupted, StopSignal, Stopped, fault_point, mark_completed
from dalle_ar.model import DalleTransformer
from dalle_ar.model.parallelize import apply_activation_checkpointing, apply_resblock_grad_scaling

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any, int], "tuple[torch.Tensor, dict]"]

MIN_SEEN_FOR_SKIP_CHECK = 200  # a few bad samples at the start of a stream say little about the data


def to_device(batch, device, dtype: torch.dtype):
    """Move tensors to the device; floating tensors take the engine's compute dtype."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, dtype=dtype if batch.is_floating_point() else None, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, dtype) for k, v in batch.items()}
    return batch


@dataclass
class _Meter:
    """What the progress bar and the log report between two log lines."""

    smoothed: float | None = None  # the bar's loss: EMA 0.9 of the step losses
    t0: float = 0.0
    seen: int = 0                  # samples since the last log line (this rank)
    in_a_row: int = 0              # non-finite losses in a row


class Trainer:
    """Wraps a model in a DeepSpeed engine and runs a step-counted training loop.

    `loss_fn(module, batch, step) -> (loss, metrics)` is the only model-specific piece. `export_config`
    is written next to the exported weights so `<out>/export` is self-describing."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, *, name: str, export_config: dict,
                 extra_files: dict[str, str] | None = None, lr_decay_steps: int | None = None):
        if cfg.init_from:  # weights only, checked before anything is set up or written (a resume overrides them)
            models.init_from(model, cfg.init_from, export_config)
        setup_distributed()
        import deepspeed
        from torch.optim.lr_scheduler import LambdaLR

        self.cfg, self.name, self.export_config = cfg, name, export_config
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.is_main = rank() == 0
        if self.is_main:  # before anything is written to --out: one live run per directory
            lock.acquire(self.out)
        # from here on a SIGTERM/SIGINT stops the run cleanly (`fit` acts on one that came before it started)
        self.stop = StopSignal(interrupt=world_size() == 1).install()
        torch.manual_seed(cfg.seed)
        self.dtype = compute_dtype(cfg)
        ds_config = build_ds_config(cfg, dtype=self.dtype)
        self.plateau = PlateauHalving.from_config(cfg)
        factor = lr_factor(cfg, self.plateau, lr_decay_steps)
        self.grad_scaler = self._prepare_model(model, ds_config)
        optimizer = build_optimizer(model, cfg)
        deepspeed_clips_zero_dim_gradients()
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config,
            lr_scheduler=lambda opt: LambdaLR(opt, factor))
        self.device = self.engine.device
        if self.grad_scaler is not None:
            self.grad_scaler.to(self.device)
        self.ema = EMA(self.module, cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.consumed = 0      # micro-batches taken from the data stream (the data position)
        self.nonfinite = 0     # micro-batches skipped for a NaN/Inf loss
        self.rng = RNGStreams()
        self.bar_metrics: dict[str, str] = {}  # shown on the progress bar from the step they are set (previews)
        self.checkpointer = self._checkpointer(export_config, extra_files or {})
        self.logger = RunLogger(self.out, enabled=self.is_main)
        if self.is_main:
            self._write_run_files(ds_config)
        if cfg.resume and self.checkpointer.complete_checkpoints():
            self.load()
        elif cfg.init_from and self.is_main:
            print(f"{name}: weights from {cfg.init_from}; optimizer, LR schedule and step start at 0", flush=True)

    def _prepare_model(self, model: nn.Module, ds_config: dict):
        """Training features applied to the model before DeepSpeed wraps it; returns the fp16 per-resblock
        gradient scaler when on."""
        cfg = self.cfg
        if cfg.activation_checkpointing:  # recompute each block's activations in backward
            if not isinstance(model, DalleTransformer):
                raise ConfigError(f"--activation_checkpointing: {type(model).__name__} does not support it; drop the flag")
            apply_activation_checkpointing(model)
        grad_scaler = None
        if cfg.resblock_grad_scaling:  # fp16: a gradient scale per residual branch (paper appendix D)
            if not isinstance(model, DalleTransformer):
                raise ConfigError(f"--resblock_grad_scaling: {type(model).__name__} has no resblocks to scale; drop the flag")
            fp16 = ds_config["fp16"]  # the per-branch scales start and grow like DeepSpeed's global one
            grad_scaler = apply_resblock_grad_scaling(model, init_scale=2.0 ** fp16["initial_scale_power"],
                                                      window=fp16["loss_scale_window"])
        if cfg.compile:  # in place: the module keeps its parameter names, so checkpoints don't change
            model.compile()
        return grad_scaler

    def _checkpointer(self, export_config: dict, extra_files: dict[str, str]) -> Checkpointer:
        """Every piece of state beyond DeepSpeed's own, under the client_state keys checkpoints have always had."""
        ckpt = Checkpointer(self.engine, self.ckpt_dir, keep=self.cfg.keep_checkpoints, is_main=self.is_main,
                            zero_stage=self.cfg.zero_stage, export_config=export_config, extra_files=extra_files,
                            ema=self.ema)
        ckpt.register(None, StateFns(self._counters, self._load_counters))  # step, consumed, nonfinite
        ckpt.register("rng", self.rng)
        if self.ema is not None:
            ckpt.register("ema", self.ema, required="checkpoint has no EMA weights but --ema_decay is set; resume without it")
            ckpt.register("ema_updates", StateFns(lambda: self.ema.updates, lambda n: setattr(self.ema, "updates", n)))
        if self.plateau is not None:
            ckpt.register("plateau", self.plateau)
        if self.cfg.optimizer == "muon":
            ckpt.register("muon_order", StateFns(lambda: MUON_ORDER, self._check_muon_order),
                          required="a Muon checkpoint written before dalle-ar kept Muon's matrices in the model's order "
                                   "(DeepSpeed sorts them by shape), so its optimizer state would land on the wrong "
                                   "matrices; resume it with the dalle-ar that wrote it, or pass --no-resume to start over")
        if self.grad_scaler is not None:
            ckpt.register("resblock_grad_scaler", StateFns(self.grad_scaler.checkpoint_state,
                                                           self.grad_scaler.load_checkpoint_state))
        return ckpt

    @staticmethod
    def _check_muon_order(order: str) -> None:
        if order != MUON_ORDER:
            raise ConfigError(f"checkpoint: Muon matrices in order {order!r}, this version keeps them in {MUON_ORDER!r}; "
                              f"resume it with the dalle-ar that wrote it, or pass --no-resume to start over")

    def _counters(self) -> dict:
        return {"step": self.step, "consumed": self.consumed, "nonfinite": self.nonfinite}

    def _load_counters(self, state: dict) -> None:
        self.step = int(state["step"])
        self.consumed = int(state.get("consumed", self.step * self.cfg.grad_accum))
        self.nonfinite = int(state.get("nonfinite", 0))

    def _write_run_files(self, ds_config: dict) -> None:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # + the world size, so that a run's training FLOPs count every rank (metrics.stage_training_flops)
        save_json(self.out / "train_config.json", {**asdict(cfg), "world_size": world_size()})
        save_json(self.out / "ds_config.resolved.json", ds_config)
        zero = ds_config["zero_optimization"]
        offload = {k: v.get("device") for k, v in zero.items() if k.startswith("offload_") and isinstance(v, dict)}
        print(f"{self.name}: DeepSpeed ZeRO-{zero['stage']}, micro-batch {cfg.batch_size} x accumulation {cfg.grad_accum} "
              f"x {world_size()} ranks, {str(self.dtype).removeprefix('torch.')}, clip {cfg.grad_clip}"
              f"{', offload ' + str(offload) if offload else ''} (from {cfg.ds_config} + flags; "
              f"resolved: {self.out / 'ds_config.resolved.json'})", flush=True)

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> str:
        """A checkpoint of this step on all ranks (atomic; see `checkpointer.py`); returns its tag."""
        return self.checkpointer.save(self.step)

    def load(self) -> None:
        """Resume from the newest complete checkpoint: weights, optimizer, LR schedule, RNG streams (applied
        in `fit`, after the data stream is fast-forwarded), EMA, plateau and scaler state, the data position."""
        path, tag = self.checkpointer.load()
        if self.is_main:
            log.info("resumed %s from %s at step %d", self.name, path, self.step)
            print(f"{self.name}: resumed from {self.ckpt_dir / tag} at step {self.step}", flush=True)

    # -- logging -----------------------------------------------------------------------------
    def log(self, metrics: dict) -> None:
        """wandb (when on) and `<out>/metrics.jsonl` (always, rank 0): the loss curve without wandb."""
        self.logger.log(metrics, self.step)

    def log_image(self, key: str, path: str | Path) -> None:
        """Log a PNG already written to disk (sample or reconstruction grid)."""
        self.logger.log_image(key, path, self.step)

    # -- previews -----------------------------------------------------------------------------
    def preview_due(self) -> bool:
        """Whether this step writes a preview (sample grid, reconstructions, retrieval): every `sample_every`
        steps and at the last step (the one grid of a run with sample_every 0)."""
        every = self.cfg.sample_every
        return bool(every and self.step % every == 0) or self.step == self.cfg.steps

    @contextmanager
    def previewing(self):
        """A preview inside the loop: the model in eval mode under no_grad, then back in the mode it was in, and the
        random streams as they were, so a run with previews trains bit for bit like one without (and resumes so)."""
        state, was_training = rng_state(), self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                yield self.module
        finally:
            self.module.train(was_training)
            set_rng_state(state)

    # -- one step ----------------------------------------------------------------------------
    def micro_step(self, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's step for one micro-batch (an optimizer step at the accumulation
        boundary, where the per-resblock gradient scales are updated too)."""
        self._update(self._backward(loss))

    def _backward(self, loss: torch.Tensor) -> float | None:
        """Backward of one micro-batch; returns the global fp16 loss scale it ran at (per-resblock scaling)."""
        global_scale = None
        if self.grad_scaler is not None:  # the scale DeepSpeed multiplies this loss by
            global_scale = self.engine.optimizer.loss_scale
            self.grad_scaler.set_loss_scale(global_scale)
        self.engine.backward(loss)
        fault_point(f"step:{self.step + 1}")
        return global_scale

    def _update(self, global_scale: float | None) -> None:
        """DeepSpeed's step: the optimizer update at the accumulation boundary (never interrupted)."""
        boundary = self.engine.is_gradient_accumulation_boundary()
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

    def _optimizer_step(self, it: Iterator, loss_fn: LossFn, items: Callable[[Any], int], meter: _Meter,
                        stop: StopSignal):
        """`grad_accum` finite micro-batches, then the EMA, step counter and plateau; returns the last
        micro-batch's loss and metrics. A NaN/Inf loss skips its micro-batch (no backward; all ranks agree).
        A stop signal while waiting for data or in a forward/backward abandons the step: the data position,
        skip count and random streams go back to the step boundary, then `Interrupted` propagates."""
        boundary = (self.consumed, self.nonfinite, rng_state()) if stop.interrupt else None
        micro = 0
        try:
            while micro < self.cfg.grad_accum:
                with stop.interruptible():
                    batch = to_device(next(it), self.device, self.dtype)
                    self.consumed += 1
                    loss, metrics = loss_fn(self.engine, batch, self.step)
                    value = loss.item()
                    if any_rank(not math.isfinite(value), self.device):
                        self._skip_nonfinite(value, meter)
                        continue
                    meter.in_a_row = 0
                    global_scale = self._backward(loss)
                self._update(global_scale)
                meter.seen += items(batch)
                micro += 1
        except Interrupted:
            self.consumed, self.nonfinite = boundary[0], boundary[1]
            set_rng_state(boundary[2])
            raise
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        if self.plateau is not None:  # the same decision on every rank: the rank-averaged loss
            self.plateau.observe(mean_over_ranks(value, self.device))
        return value, metrics

    def _skip_nonfinite(self, value: float, meter: _Meter) -> None:
        self.nonfinite, meter.in_a_row = self.nonfinite + 1, meter.in_a_row + 1
        if meter.in_a_row >= self.cfg.max_nonfinite:
            raise FloatingPointError(
                f"{self.name}: {meter.in_a_row} non-finite losses in a row at step {self.step + 1}; lower "
                f"--lr or check the data. Last good checkpoint: {self.ckpt_dir / 'latest'}")
        log.warning("%s: loss is %s at step %d; micro-batch skipped (%d so far)",
                    self.name, value, self.step + 1, self.nonfinite)

    def _report(self, value: float, metrics: dict, meter: _Meter, bar, show: tuple[str, ...], skips) -> None:
        """The progress bar every step; the log (and the bad-data check) every `log_every` steps."""
        cfg = self.cfg
        meter.smoothed = value if meter.smoothed is None else 0.9 * meter.smoothed + 0.1 * value
        dt = time.perf_counter() - meter.t0
        rate = meter.seen * world_size() / max(dt, 1e-9)
        bar.update(1)
        extra = {k: f"{metrics[k]:.3g}" for k in show if k in metrics}
        if skips is not None and skips.total:
            extra["skipped"] = skips.total
        if self.nonfinite:
            extra["nonfinite"] = self.nonfinite
        extra.update(self.bar_metrics)
        bar.set_postfix(loss=f"{meter.smoothed:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                        samples_s=f"{rate:.1f}", **extra)
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            data = {} if skips is None else {"data_seen": skips.seen, "data_skipped": skips.total}
            data.update(self.precision_stats())
            self.log({"loss": value, "lr": self.scheduler.get_last_lr()[0], "samples_per_s": rate,
                      "nonfinite_skipped": self.nonfinite, **data, **metrics})
            meter.t0, meter.seen = time.perf_counter(), 0
            if skips is not None:  # too much bad data: stop early with the reasons (DataError)
                skips.check(cfg.max_skip_fraction, min_seen=MIN_SEEN_FOR_SKIP_CHECK)

    def _stop_or_save(self, stop: StopSignal, bar) -> None:
        """After a SIGTERM/SIGINT on any rank: save and raise `Stopped`; else the periodic checkpoint."""
        if any_rank(stop.received is not None, self.device):
            self._stop(stop, bar)
        if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
            self.save()

    def _stop(self, stop: StopSignal, bar) -> None:
        """Checkpoint this step boundary (unless it already is), then raise `Stopped`: exit 0 when the run can be
        resumed from where it stopped, 128 + signal number when it stopped before its first step."""
        bar.close()
        by, tag = stop.received or "a signal on another rank", f"step_{self.step:08d}"
        code = 0
        if self.step == 0:
            msg, code = f"{self.name}: stopped by {by} before the first step; nothing to save", 128 + (stop.signum or 15)
        elif tag in self.checkpointer.complete_checkpoints():
            msg = f"{self.name}: stopped by {by} at step {self.step}; {self.ckpt_dir / tag} is its checkpoint"
        else:
            msg = f"{self.name}: stopped by {by} at step {self.step}; saved {self.ckpt_dir / self.save()}"
        if self.is_main:
            print(msg + (". Run the same command again to resume." if code == 0 else "."), flush=True)
        raise Stopped(code)

    def _finish(self, skips, meter: _Meter) -> Path:
        """The final checkpoint (unless this step has one) and `<out>/export`; returns the export."""
        if skips is not None:
            skips.check(self.cfg.max_skip_fraction, min_seen=MIN_SEEN_FOR_SKIP_CHECK)
        final = f"step_{self.step:08d}"
        if final not in self.checkpointer.complete_checkpoints():
            self.save()
        export = self.checkpointer.export(final, self.out / "export")
        if self.is_main and (skips is not None or self.nonfinite):
            print(f"{self.name}: done at step {self.step}; {self.nonfinite} non-finite micro-batches skipped"
                  + (f"; data: {skips.summary()}" if skips is not None else ""), flush=True)
        self.logger.finish({"final_loss": meter.smoothed, "steps": self.step})
        return export

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, batches: Iterable, loss_fn: LossFn, items: Callable[[Any], int] = lambda b: len(b[0]),
            on_step: Callable[["Trainer"], None] | None = None, show: tuple[str, ...] = (), skips=None) -> Path:
        """Train until `cfg.steps` optimizer steps; returns the export directory. `show` names metrics
        from `loss_fn` that the progress bar displays next to loss, lr and samples/s; `skips` (a
        `decode.SkipCounter`) puts the bad-data count on the bar and in the end-of-run summary.

        - Resume: the data stream is fast-forwarded past the micro-batches already consumed, so a
          deterministic stream continues exactly where the checkpoint left it.
        - A NaN/Inf loss skips its micro-batch (no backward, no optimizer step; all ranks agree) and is
          counted; `max_nonfinite` in a row stop the run, pointing at the last good checkpoint.
        - SIGTERM/SIGINT (`signals.py`): a step in its data wait or forward/backward is abandoned at once (one
          process; with several ranks it finishes), an optimizer update or save completes; the last step boundary
          is checkpointed unless it already is, and `Stopped` is raised (exit 0; 128 + signal before step 1)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, dynamic_ncols=True, mininterval=1.0,
                   disable=not (self.is_main and cfg.progress))
        meter = _Meter(t0=time.perf_counter())
        try:
            try:
                self._loop(iter(batches), loss_fn, items, on_step, show, skips, self.stop, bar, meter)
            except Interrupted:
                self._stop(self.stop, bar)
            bar.close()
            export = self._finish(skips, meter)
            mark_completed()  # a SIGTERM from here on (teardown) finds nothing to save: exit 0
        finally:
            self.stop.restore()
            if self.is_main:
                lock.release(self.out)
        fault_point("finished")
        return export

    def _loop(self, it: Iterator, loss_fn: LossFn, items, on_step, show, skips, stop: StopSignal, bar, meter) -> None:
        cfg = self.cfg
        with stop.interruptible():
            for _ in range(self.consumed):
                next(it)
        self.rng.restore()  # after the fast-forward: starting the loader draws a seed from torch's RNG
        self.logger.start_wandb(cfg.wandb, cfg.wandb_project, cfg.wandb_name or f"{self.name}-{self.out.name}",
                                {"train": asdict(cfg), "model": self.export_config}, cfg.wandb_entity)
        while self.step < cfg.steps:
            value, metrics = self._optimizer_step(it, loss_fn, items, meter, stop)
            self._report(value, metrics, meter, bar, show, skips)
            if on_step is not None:
                on_step(self)
            self._stop_or_save(stop, bar)
