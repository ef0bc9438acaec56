"""Checkpoints: one `Checkpointer` saves and resumes every piece of training state.

Each component (the step counters, RNG streams, EMA, plateau schedule, fp16 per-resblock scaler, ...)
exposes `state_dict()` / `load_state_dict(state)` and is registered under the key its state has in
DeepSpeed's `client_state` (the keys older checkpoints have, so they still resume). DeepSpeed saves the
module, optimizer and LR scheduler itself. A save is atomic: every rank writes its files into `step_N/`,
rank 0 adds the consolidated fp32 weights (`step_N/export/`, loadable without DeepSpeed), marks the
directory complete and only then points `latest` at it (temp file + rename), then prunes old ones. A crash
at any point leaves the previous complete checkpoint as the one that resume picks."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn

from dalle_ar.checkpoint import save_pretrained
from dalle_ar.config import ConfigError, SaveError
from dalle_ar.engine.distributed import barrier, world_size
from dalle_ar.engine.ema import EMA
from dalle_ar.engine.signals import fault_point

COMPLETE = "complete"  # marker written into a checkpoint directory once every rank has written its part


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class StateFns:
    """A component from two functions: a counter, or an object whose methods have other names."""

    state_dict: Callable[[], Any]
    load_state_dict: Callable[[Any], None]


@dataclass
class _Entry:
    key: str | None     # client_state key; None: the component's dict is merged at the top level
    component: Stateful
    required: str | None  # the error when a resumed checkpoint lacks it; None: skipped (an older checkpoint)


class Checkpointer:
    """Saves, resumes, prunes and exports through a DeepSpeed `engine`, in `directory` (`<out>/checkpoints`)."""

    def __init__(self, engine, directory: Path, *, keep: int, is_main: bool, zero_stage: int,
                 export_config: dict, extra_files: dict[str, str], ema: EMA | None):
        self.engine, self.dir, self.keep, self.is_main, self.zero_stage = engine, Path(directory), keep, is_main, zero_stage
        self.export_config, self.extra_files, self.ema = export_config, extra_files, ema
        self.entries: list[_Entry] = []

    def register(self, key: str | None, component: Stateful, *, required: str | None = None) -> None:
        self.entries.append(_Entry(key, component, required))

    def client_state(self) -> dict:
        state = {}
        for e in self.entries:
            if e.key is None:
                state.update(e.component.state_dict())
            else:
                state[e.key] = e.component.state_dict()
        return state

    def save(self, step: int) -> str:
        """Checkpoint `step`; an OSError on the way (disk full, I/O error) leaves the previous complete checkpoint as
        the one that resumes (this one never gets its marker) and raises SaveError saying so."""
        try:
            return self._save(step)
        except OSError as e:
            kept = self.complete_checkpoints()
            raise SaveError(f"{self.dir / f'step_{step:08d}'}: saving failed ({e.strerror or e}); the run stops. "
                            + (f"{self.dir / kept[-1]} is the checkpoint that resumes" if kept else "no checkpoint yet")
                            + "; free space (or fix the disk) and run the same command again") from e

    def _save(self, step: int) -> str:
        tag = f"step_{step:08d}"
        state = self.client_state()
        if self.is_main:
            (self.dir / tag / COMPLETE).unlink(missing_ok=True)  # re-saving a tag after a resume
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state=state, save_latest=False)
        fault_point(f"save:{step}")
        barrier()
        if self.is_main:  # consolidated fp32 weights beside the shards: sampling loads them without DeepSpeed
            save_pretrained(self.consolidated_state_dict(tag), self.dir / tag / "export", self.export_config,
                            self.extra_files)
            (self.dir / tag / COMPLETE).write_text(json.dumps({"step": step, "world_size": world_size()}))
            tmp = self.dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.dir / "latest")
            self._prune(keep=tag)
        barrier()
        return tag

    def complete_checkpoints(self) -> list[str]:
        """Tags of the complete checkpoints, oldest first: those with the marker, and the one `latest` names
        (written only after the marker here, and last by DeepSpeed, so also right for older checkpoints)."""
        tags = {p.parent.name for p in self.dir.glob(f"step_*/{COMPLETE}")}
        latest = self.dir / "latest"
        if latest.is_file() and (self.dir / latest.read_text().strip()).is_dir():
            tags.add(latest.read_text().strip())
        return sorted(tags)

    def _prune(self, keep: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and crash leftovers."""
        complete = self.complete_checkpoints()
        doomed = set(complete[: max(0, len(complete) - self.keep)])
        doomed |= {p.name for p in self.dir.glob("step_*") if p.is_dir() and p.name not in complete}
        for name in doomed - {keep}:
            shutil.rmtree(self.dir / name, ignore_errors=True)

    def load(self) -> tuple[str, str]:
        """Resume from the newest complete checkpoint: DeepSpeed's part (weights, optimizer, LR schedule),
        then each registered component in registration order. Returns DeepSpeed's path and the tag."""
        tag = self.complete_checkpoints()[-1]
        path, state = self.engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"{self.dir / tag}: could not load this checkpoint; delete it to resume from "
                               f"the one before, or pass --no-resume to start over")
        for e in self.entries:
            if e.key is None:
                e.component.load_state_dict(state)
            elif e.key in state:
                e.component.load_state_dict(state[e.key])
            elif e.required is not None:
                raise ConfigError(f"{path}: {e.required}")
        return path, tag

    def consolidated_state_dict(self, tag: str) -> dict[str, torch.Tensor]:
        """fp32 weights on rank 0: from the module (ZeRO-0) or gathered from the ZeRO shards (1-3);
        with --ema_decay, the EMA weights take the parameters' place."""
        if self.zero_stage == 0:
            module: nn.Module = self.engine.module
            state = {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(self.dir), tag=tag)
            # the optimizer's shards hold only trainable parameters: frozen ones (e.g. a CLIP's fixed sine-cosine
            # positions) are whole on every rank under ZeRO 1-2 and come from the module
            for k, v in self.engine.module.state_dict().items():
                if k not in state and v.numel():
                    state[k] = v.detach().float().cpu()
        if self.ema is not None:
            state.update(self.ema.state_dict())
        return state

    def export(self, tag: str, out: Path) -> Path:
        """`out/` = config.json + model.safetensors of checkpoint `tag` (rank 0 writes; all ranks wait)."""
        if self.is_main:
            save_pretrained(self.consolidated_state_dict(tag), out, self.export_config, self.extra_files)
        barrier()
        return out
