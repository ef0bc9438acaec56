"""The command line: every script's flags come from the config dataclasses it uses.

`add_config_args` turns each dataclass field into a flag with the same default as the class, so a flag
never exists in the class but not the CLI (booleans are --x / --no-x; --help shows each field's comment from
the dataclass source and the allowed values). `resolve` layers the values: class defaults < the script's own
defaults < (TrainConfig: the run's ds_config.json) < preset < `--config run.json` < flags; with --init_from EXPORT
the export's config.json sits above the default preset and below an explicit one. `parse` is a script's entry;
`run_cli` turns config and data errors into one line naming the file and the fix; `run_script` runs another script
as a process of its own (train/train_matched.py runs each trainer so, train/compare_scaling.py each budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import re
import subprocess
import sys
import tokenize
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from dalle_ar.config import (PRESETS, ClipConfig, ConfigError, DalleConfig, DataError, DVAEConfig, DVAELossConfig,
                             SampleConfig, SaveError, TrainConfig, ds_config_path, from_dict, load_json)


def _int(name: str):
    """int, with the fix in the message: `--top_k 0.9` is a probability mass, which is --top_p."""
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(INT_HINTS.get(name, "expected an integer, got {text!r}").format(text=text))
    parse.__name__ = "int"
    return parse


INT_HINTS = {"top_k": "--top_k is a number of tokens (an integer, 0 = off), got {text!r}; to sample from the smallest "
                      "set of tokens whose probabilities sum to {text}, pass --top_p {text} (nucleus sampling). "
                      "DALLE-pytorch's --top_k 0.9 kept the most likely 10% of the codebook: --top_k 819 of 8192 codes"}


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Each field's `# comment` in the dataclass source: the one after it on its line, else the block of comment
    lines right above it. The source stays the one place a field is explained; --help shows it."""
    try:
        lines = inspect.getsource(cls).splitlines(keepends=True)
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(iter(lines).__next__) if tok.type == tokenize.COMMENT}
    out = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"    (\w+)\s*:", line)
        if not m or m.group(1) not in {f.name for f in fields(cls)}:
            continue
        if i in comments:  # the comment after the field
            text = [comments[i]]
        else:  # the comment lines right above it
            text, j = [], i - 1
            while j in comments and lines[j - 1].lstrip().startswith("#"):
                text.insert(0, comments[j])
                j -= 1
        out[m.group(1)] = " ".join(text)
    return out


def _help(cls: type, f: dataclasses.Field, default) -> str:
    comment = field_comments(cls).get(f.name, "")
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return (f"{comment} " if comment else "").replace("%", "%%") + f"(default: {shown})"


class _Flag(argparse.BooleanOptionalAction):
    """--compile / --no-compile (each also with dashes); the usage line shows the first pair only."""

    def format_usage(self) -> str:
        return " | ".join(self.option_strings[:2])


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
            t = typing.get_type_hints(cls)[f.name]
            if t is bool:  # --compile / --no-compile
                group.add_argument(*names, dest=f.name, action=_Flag, default=None,
                                   help=_help(cls, f, default))
            elif typing.get_origin(t) is typing.Literal:
                group.add_argument(*names, dest=f.name, choices=typing.get_args(t), default=None, help=_help(cls, f, default))
            else:
                group.add_argument(*names, dest=f.name, type=_int(f.name) if t is int else t, default=None,
                                   metavar=type(default).__name__.upper(), help=_help(cls, f, default))
    parser.add_argument("--config", default=None, help="JSON file with values for any of the fields above "
                        "(flat, or nested by section name); flags given here override it")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model size preset (default: tiny; with --init_from, the export's config.json)")
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


def _export_sections(args: argparse.Namespace, file_data: dict) -> dict:
    """The --init_from export's config.json (the model's sections are taken from it unless given), or {}."""
    path = getattr(args, "init_from", None) or file_data.get("init_from") or file_data.get("train", {}).get("init_from")
    if not path:
        return {}
    from dalle_ar.models import export_sections

    return export_sections(path)


def resolve(args: argparse.Namespace, *classes: type, defaults: dict[type, dict] | None = None):
    """Build each dataclass from class defaults < script `defaults` < (TrainConfig: ds_config.json)
    < the default preset < (with --init_from: the export's config.json) < --preset < --config file < flags."""
    if getattr(args, "preset", None) is None:  # not given: tiny, below what an --init_from export says
        args.preset, args.preset_given = "tiny", False
    preset_given = getattr(args, "preset_given", True)
    file_data = load_json(args.config) if args.config else {}
    export = _export_sections(args, file_data)
    out, user = [], {}
    for cls in classes:
        section = file_data.get(_SECTION.get(cls, cls.__name__), {})
        flat = {k: v for k, v in file_data.items() if not isinstance(v, dict)}
        names = {f.name for f in fields(cls)}
        values = dict((defaults or {}).get(cls, {}))
        if cls is TrainConfig:
            ds_path = getattr(args, "ds_config", None) or section.get("ds_config") or flat.get("ds_config") or TrainConfig.ds_config
            ds = load_json(ds_config_path(ds_path))
            values.update(ds_config_values(ds))
        if not preset_given:
            values.update(PRESETS["tiny"].get(cls, {}))
        values.update({k: v for k, v in export.get(cls, {}).items() if k in names})
        if preset_given:
            values.update(PRESETS[args.preset].get(cls, {}))
        user[cls] = {k: v for k, v in flat.items() if k in names}
        user[cls].update(section)
        user[cls].update({f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})
        values.update(user[cls])
        cfg = from_dict(cls, values, source=args.config or "command line")
        if cls is TrainConfig and cfg.ds_config == ds_path:
            cfg.ds_json = ds  # carried to the engine: the file is read once
        out.append(cfg)
    if not preset_given and not export:
        _warn_paper_sizes_with_tiny(user)
    known = set().union(*({f.name for f in fields(c)} for c in classes)) | set(_SECTION.values())
    stray = sorted(k for k in file_data if k not in known and k not in _SECTION.values())
    if stray:
        raise ConfigError(f"{args.config}: unknown field(s) {stray}; valid: {sorted(known)}")
    return out[0] if len(out) == 1 else out


def _warn_paper_sizes_with_tiny(user: dict[type, dict]) -> None:
    """`--image_size 256 --num_tokens 8192` without --preset: the sizes are the paper's, but the rest of the recipe
    (widths, loss, ...) would silently stay the tiny preset's. Say so once, naming both."""
    paper, tiny = PRESETS["paper"], PRESETS["tiny"]
    big = {k: v for cls, given in user.items() for k, v in given.items()  # sizes, not switches such as --use_caption
           if not isinstance(v, bool) and k in paper.get(cls, {}) and paper[cls][k] == v and tiny.get(cls, {}).get(k) != v}
    kept = {k: v for cls, given in user.items() if cls in tiny for k, v in tiny[cls].items()
            if k not in given and paper.get(cls, {}).get(k, getattr(cls, k, None)) != v}
    if big and kept and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {' '.join(f'--{k} {v}' for k, v in big.items())} are the paper's sizes, but no --preset was "
              f"given, so the tiny preset's recipe still applies ({', '.join(f'{k} {v}' for k, v in kept.items())}); "
              f"pass --preset paper for the paper's recipe, or --preset tiny to keep this one", file=sys.stderr)


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
    """Script entry point: a config or missing-file error is one line naming the file and the fix; SIGTERM outside
    a Trainer's loop exits 143, or 0 once the run has completed (`engine.signals.script_handlers`)."""
    from dalle_ar.engine.signals import done_handlers, script_handlers
    script_handlers()
    try:
        main()
    except (ConfigError, DataError, SaveError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    done_handlers()  # the work is done; the interpreter's teardown (~1 s with torch) is not killed by a SIGTERM


# A launcher's (or an earlier in-process trainer's) rendezvous variables: a script run by `run_script` is a run of its
# own, one process on a port of its own; inheriting them would make it join (or collide with) this process's group.
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_script(root: Path, script: str, argv: list[str], env: dict | None = None, log: Path | None = None) -> int:
    """python <root>/<script> argv in its own process (`root` first on its path, `env` added to this process's
    environment, stdout and stderr into `log` when given); its exit status."""
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS} | (env or {})
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    if log is None:
        return subprocess.run([sys.executable, str(Path(root) / script), *argv], env=full).returncode
    with open(log, "w") as f:
        return subprocess.run([sys.executable, str(Path(root) / script), *argv], env=full, stdout=f,
                              stderr=subprocess.STDOUT).returncode
