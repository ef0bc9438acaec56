"""The command line: every script's flags come from the config dataclasses it uses.

`add_config_args` turns each dataclass field into a flag with the same default as the class, so a flag
never exists in the class but not the CLI. `resolve` layers the values: class defaults < the script's own
defaults < (TrainConfig: the run's ds_config.json) < preset < `--config run.json` < flags. `parse` is a
script's entry; `run_cli` turns config and data errors into one line naming the file and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import fields
from typing import Any

from dalle_ar.config import (PRESETS, ClipConfig, ConfigError, DalleConfig, DataError, DVAEConfig, DVAELossConfig,
                             SampleConfig, SaveError, TrainConfig, from_dict, load_json)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(cls: type, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    return _parse_bool if t is bool else t


# Extra spellings users expect (every field also accepts dashes: --batch-size == --batch_size).
ALIASES = {"steps": ["--max_steps", "--max-steps"],
           "ds_config": ["--deepspeed_config"]}  # DeepSpeed's own flag (deepspeed.add_config_arguments)


def add_config_args(parser: argparse.ArgumentParser, *classes: type, defaults: dict[type, dict] | None = None) -> None:
    """Add one flag per dataclass field (defaults None so we can tell what the user typed)."""
    seen: dict[str, type] = {}
    for cls in classes:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        for f in fields(cls):
            if f.name in seen:
                raise RuntimeError(f"flag --{f.name} defined by both {seen[f.name].__name__} and {cls.__name__}")
            seen[f.name] = cls
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = (defaults or {}).get(cls, {}).get(f.name, default)
            names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []) + ALIASES.get(f.name, [])
            group.add_argument(*names, dest=f.name, type=_field_type(cls, f), default=None,
                               metavar=type(default).__name__.upper(), help=f"(default: {default})")
    parser.add_argument("--config", default=None, help="JSON file with values for any of the fields above "
                        "(flat, or nested by section name); flags given here override it")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size preset (default: tiny)")
    # The `deepspeed` launcher appends --local_rank=N; torchrun sets LOCAL_RANK instead.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    if TrainConfig in classes:  # DeepSpeed's CLI convention: `--deepspeed --deepspeed_config ds_config.json`
        parser.add_argument("--deepspeed", action="store_true",
                            help="accepted as in DeepSpeed's examples; training always runs through DeepSpeed")


_SECTION = {DVAEConfig: "dvae", DVAELossConfig: "dvae_loss", DalleConfig: "model", ClipConfig: "clip", TrainConfig: "train", SampleConfig: "sample"}


# TrainConfig fields that ds_config.json also sets: (field, path of keys in the JSON).
DS_CONFIG_KEYS = {"batch_size": ("train_micro_batch_size_per_gpu",), "grad_accum": ("gradient_accumulation_steps",),
                  "grad_clip": ("gradient_clipping",), "zero_stage": ("zero_optimization", "stage")}


def ds_config_values(ds: dict) -> dict[str, Any]:
    """The TrainConfig fields a DeepSpeed JSON sets (so the JSON is never silently ignored)."""
    out = {}
    for name, keys in DS_CONFIG_KEYS.items():
        node = ds
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and node != "auto":
            out[name] = node
    return out


def resolve(args: argparse.Namespace, *classes: type, defaults: dict[type, dict] | None = None):
    """Build each dataclass from class defaults < script `defaults` < (TrainConfig: ds_config.json)
    < preset < --config file < flags."""
    file_data = load_json(args.config) if args.config else {}
    out = []
    for cls in classes:
        section = file_data.get(_SECTION.get(cls, cls.__name__), {})
        flat = {k: v for k, v in file_data.items() if not isinstance(v, dict)}
        names = {f.name for f in fields(cls)}
        values = dict((defaults or {}).get(cls, {}))
        if cls is TrainConfig:
            ds_path = getattr(args, "ds_config", None) or section.get("ds_config") or flat.get("ds_config") or TrainConfig.ds_config
            ds = load_json(ds_path)
            values.update(ds_config_values(ds))
        values.update(PRESETS[args.preset].get(cls, {}))
        values.update({k: v for k, v in flat.items() if k in names})
        values.update(section)
        values.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
        cfg = from_dict(cls, values, source=args.config or "command line")
        if cls is TrainConfig and cfg.ds_config == ds_path:
            cfg.ds_json = ds  # carried to the engine: the file is read once
        out.append(cfg)
    known = set().union(*({f.name for f in fields(c)} for c in classes)) | set(_SECTION.values())
    stray = sorted(k for k in file_data if k not in known and k not in _SECTION.values())
    if stray:
        raise ConfigError(f"{args.config}: unknown field(s) {stray}; valid: {sorted(known)}")
    return out[0] if len(out) == 1 else out


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the user set field `name` (a flag, or the --config file flat or in a section), as opposed
    to a default or preset: a value the user chose has to agree with what the script finds."""
    if getattr(args, name, None) is not None:
        return True
    data = load_json(args.config) if getattr(args, "config", None) else {}
    return name in data or any(isinstance(v, dict) and name in v for v in data.values())


def parse(description: str, *classes: type, extra=None, argv=None, defaults: dict[type, dict] | None = None):
    """Standard script entry: parser from dataclasses (+ `extra(parser)` flags), then resolve.
    `defaults` are the script's own defaults (e.g. the dVAE's paper optimizer), below presets and flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra:
        extra(parser)
    add_config_args(parser, *classes, defaults=defaults)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args, resolve(args, *classes, defaults=defaults)
    except ConfigError as e:
        parser.error(str(e))


def run_cli(main) -> None:
    """Script entry point: a config or missing-file error is one line naming the file and the fix."""
    try:
        main()
    except (ConfigError, DataError, SaveError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
