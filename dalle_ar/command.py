"""`dalle-ar <subcommand> [flags]`: one console command for every script in train/ and sample/ (also `python -m
dalle_ar`). A subcommand runs its script exactly as `python train/<script>.py [flags]` would (same flags, same errors);
the scripts stay the files users read and run. `dalle-ar serve` starts the playground (the `[play]` extra)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import runpy
import sys

# subcommand -> the script's module under dalle_ar._scripts (train/<name>.py, sample/<name>.py)
SCRIPTS = {
    "make-shards": "train.make_shards",
    "validate-shards": "train.validate_shards",
    "train-tokenizer": "train.train_tokenizer",
    "train-dvae": "train.train_dvae",
    "convert-openai-dvae": "train.convert_openai_dvae",
    "encode": "train.encode",
    "train-dalle": "train.train_dalle",
    "train-clip": "train.train_clip",
    "precompute-clip": "train.precompute_clip",
    "train-prior": "train.train_prior",
    "train-decoder": "train.train_decoder",
    "train-matched": "train.train_matched",
    "compare-scaling": "train.compare_scaling",
    "generate": "sample.generate",
    "unclip-edit": "sample.unclip_edit",
    "compare": "sample.compare",
}
PLAY_EXTRA = "pip install 'dalle-ar[play]'"


def _module(sub: str) -> str:
    return f"dalle_ar._scripts.{SCRIPTS[sub]}"


def summary(sub: str) -> str:
    """The first line of the script's docstring, read without importing it (no torch for --help)."""
    spec = importlib.util.find_spec(_module(sub))
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())  # the first paragraph, up to its first sentence's end
    return first.split(". ")[0].rstrip(".") + "." if first else ""


def usage() -> str:
    width = max(map(len, [*SCRIPTS, "serve"]))
    lines = ["usage: dalle-ar <subcommand> [flags]    (dalle-ar <subcommand> --help for its flags)", "",
             "subcommands (each runs the script named after it, train/<name>.py or sample/<name>.py):"]
    lines += [f"  {sub:<{width}}  {SCRIPTS[sub].replace('.', '/')}.py: {summary(sub)}" for sub in SCRIPTS]
    lines.append(f"  {'serve':<{width}}  the playground in a browser (needs {PLAY_EXTRA})")
    return "\n".join(lines)


def serve(argv: list[str]) -> None:
    try:
        playground = importlib.import_module("dalle_ar.playground")
    except ImportError as e:
        sys.exit(f"error: dalle-ar serve: the playground needs its extra dependencies: {PLAY_EXTRA} ({e})")
    playground.main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    sub, rest = argv[0], argv[1:]
    if sub == "serve":
        return serve(rest)
    if sub not in SCRIPTS:
        sys.exit(f"error: dalle-ar: unknown subcommand {sub!r}; one of {', '.join([*SCRIPTS, 'serve'])} "
                 f"(dalle-ar --help)")
    sys.argv = [f"dalle-ar {sub}", *rest]  # argparse's prog: `usage: dalle-ar train-dalle ...`
    runpy.run_module(_module(sub), run_name="__main__")


if __name__ == "__main__":
    main()
