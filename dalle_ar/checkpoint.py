"""The one exported-weights format: a directory with `config.json` + `model.safetensors` (+ extras such
as `tokenizer.json`), readable without DeepSpeed. Training checkpoints (optimizer, ZeRO shards) are the
engine's business (`dalle_ar/engine.py`); this is what you ship and sample from.

Weights are read from safetensors, which holds tensors and nothing else. A pickled state dict
(`pytorch_model.bin`, `model.pt`, ...) is read only with `allow_pickle=True`, and even then through
torch's weights-only unpickler: no code from a checkpoint runs, whatever it contains."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dalle_ar.config import ConfigError, config_diff, load_json, save_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")


def weights_sha256(export_dir: str | Path) -> str:
    """sha256 of an export's model.safetensors: which weights made a set of token shards, wherever the export
    has moved since."""
    return hashlib.sha256((Path(export_dir) / WEIGHTS).read_bytes()).hexdigest()


def save_pretrained(weights: nn.Module | dict[str, torch.Tensor], out_dir: str | Path, config: dict,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write weights (a module or a state dict) + config atomically: into a temp dir, then rename."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    # the config also rides in the file's metadata: a weights file copied next to another config.json
    # can then say which values differ (load_pretrained)
    save_file({k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS),
              metadata={"config": json.dumps(config, sort_keys=True)})
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


def load_pretrained(path: str | Path, build: Callable[[dict], nn.Module], map_location: str = "cpu",
                    allow_pickle: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a model from `path/config.json` with `build(config)`, load `path/model.safetensors`, and
    return it on `map_location`, in eval mode. Weights that do not fit the config (another model size,
    another vocabulary) raise a ConfigError naming the config values that differ. `allow_pickle` reads a
    pickled state dict when there is no safetensors file (tensors only; see the module docstring)."""
    path = Path(path)
    saved_config = None
    if (path / WEIGHTS).exists():
        state = load_file(str(path / WEIGHTS), device=str(map_location))
        with safe_open(str(path / WEIGHTS), "pt") as f:
            saved_config = json.loads((f.metadata() or {}).get("config", "null"))
        weights = path / WEIGHTS
    else:
        weights = next((path / n for n in PICKLED_WEIGHTS if (path / n).exists()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: no {WEIGHTS}; pass the `export` directory a trainer wrote "
                                    f"(e.g. runs/<name>/export), or train one first")
        if not allow_pickle:
            raise ConfigError(f"{weights}: a pickle, and unpickling can run code; only {WEIGHTS} is read by default. "
                              f"If you trust the file, pass --allow-pickle (it is then read as tensors only)")
        state = load_pickled_state(weights, map_location)
    config = load_json(path / CONFIG)
    model = build(config)
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        diff = config_diff(saved_config, config) if isinstance(saved_config, dict) else []
        raise ConfigError(f"{weights}: weights are from a different config than {path / CONFIG}"
                          + (f" ({'; '.join(diff[:4])}: weights vs config.json)" if diff else "")
                          + f"; e.g. {k} is {list(got)} in the weights but {list(want)} for config.json "
                          f"({len(wrong)} tensors differ); restore the config.json saved with these weights, or re-export")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{weights}: weights do not match {path / CONFIG} (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}); re-export the checkpoint or fix config.json")
    return model.to(map_location).eval(), config  # load_state_dict copies into the CPU-built parameters


def load_pickled_state(file: str | Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A pickled state dict, read by torch's weights-only unpickler: tensors, numbers, strings and
    containers; anything that would construct another object (and so could run code) is refused."""
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{file}: refused, it holds more than tensors ({first[:200]}); unpickling it could run "
                          f"code. Convert it to safetensors where you trust it, or ask its author for a .safetensors") from None
    except Exception as e:
        raise ConfigError(f"{file}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model", "module"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{file}: not a state dict of tensors (got {type(state).__name__})")
    return state
