"""The one exported-weights format: a directory with `config.json` + `model.safetensors` (+ extras such
as `tokenizer.json`), readable without DeepSpeed. Training checkpoints (optimizer, ZeRO shards) are the
engine's business (`dalle_ar/engine.py`); this is what you ship and sample from."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dalle_ar.config import load_json, save_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(weights: nn.Module | dict[str, torch.Tensor], out_dir: str | Path, config: dict,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write weights (a module or a state dict) + config atomically: into a temp dir, then rename."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS))
    save_json(tmp / CONFIG, config)
    for name, src in (extra_files or {}).items():
        shutil.copy(src, tmp / name)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_pretrained(path: str | Path, build: Callable[[dict], nn.Module], map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from `path/config.json` with `build(config)`, load `path/model.safetensors`, and
    return it on `map_location`, in eval mode."""
    path = Path(path)
    if not (path / WEIGHTS).exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS}; pass the `export` directory a trainer wrote "
                                f"(e.g. runs/<name>/export), or train one first")
    config = load_json(path / CONFIG)
    model = build(config)
    state = load_file(str(path / WEIGHTS), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path / WEIGHTS}: weights do not match {path / CONFIG} (missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}); re-export the checkpoint or fix config.json")
    return model.to(map_location).eval(), config  # load_state_dict copies into the CPU-built parameters
