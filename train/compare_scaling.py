#!/usr/bin/env python
"""AR (DALL-E) versus diffusion (unCLIP) at several matched training budgets: train/train_matched.py at each, then
the reports side by side, plots against training FLOPs, and a verdict computed from the numbers.

  python train/compare_scaling.py --budgets 2e13,4e13,8e13 --out outputs/compare_scaling \\
      --report docs/compare/scaling --train-images data/shapes --train-tokens data/tokens --tokenizer runs/tokenizer \\
      --dvae runs/dvae/export --clip runs/clip/export --eval-clip runs/eval_clip/export --synthetic-prompts 32 ...

Each budget B, smallest first, is `python train/train_matched.py --train-budget-flops B --out <out>/budget_<B>
--embeddings <embeddings>` with every other flag given here (train_matched.py's and sample/compare.py's; see their
--help), in a process of its own. All budgets share one CLIP-embedding precompute (--embeddings, default
<out>/clip_embeddings). The same command again skips a budget whose report.json that command already made, and
train_matched.py skips the finished training runs of the others (so changed evaluation flags re-evaluate without
retraining).

Then --report DIR (default <out>/report) gets scaling.json, report.md, scaling.png and scaling_by_objects.png: per
budget and backend the best setting (highest caption accuracy; ties: higher evaluator CLIP score) with its counted
training FLOPs, caption accuracy (all prompts, 1-shape, 2-shape), evaluator CLIP score, FD and seconds per kept
image, with 95% intervals; the real renders of the largest budget as the ceiling; and the verdict of
dalle_ar.scaling.verdict (which backend leads at each budget and whether the intervals separate, each backend's
trend, the 1- vs 2-shape gap, the cost per image).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dalle_ar import scaling
from dalle_ar.cli import run_cli, run_script
from dalle_ar.config import ConfigError, load_json, save_json

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    """This script's flags; every other flag goes to train/train_matched.py (and through it to sample/compare.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a train_matched.py flag
    a = p.add_argument
    a("--budgets", required=True, help="each backend's training FLOPs, comma-separated, at least two: 2e13,4e13,8e13")
    a("--out", default="outputs/compare_scaling", help="one train_matched.py run per budget in <out>/budget_<B>")
    a("--report", default=None, help="directory of scaling.json, report.md and the plots (default: <out>/report)")
    a("--embeddings", default=None,
      help="the CLIP embeddings every budget trains unCLIP on, computed once (default: <out>/clip_embeddings)")
    # set here for each budget: given ones are refused
    a("--train-budget-flops", "--train_budget_flops", dest="train_budget_flops", default=None, help=argparse.SUPPRESS)
    return p


def budget_argv(args, rest: list[str], budget: float) -> list[str]:
    """train_matched.py's command line for one budget."""
    return ["--train-budget-flops", scaling.budget_name(budget), "--out", str(budget_dir(args, budget)),
            "--embeddings", args.embeddings, *rest]


def budget_dir(args, budget: float) -> Path:
    return Path(args.out) / f"budget_{scaling.budget_name(budget)}"


def run_budget(args, rest: list[str], budget: float) -> Path:
    """train_matched.py at one budget, unless this command already made its report.json. Returns that report.json."""
    argv, out = budget_argv(args, rest, budget), budget_dir(args, budget)
    report, record = out / "report.json", out / "compare_scaling_argv.json"  # written once the budget is done
    name = scaling.budget_name(budget)
    if report.exists() and record.exists() and load_json(record) == argv:
        print(f"budget {name}: {report} already made by this command; skipped (delete it to re-evaluate)", flush=True)
        return report
    print(f"budget {name}: python train/train_matched.py {shlex.join(argv)}", flush=True)
    status = run_script(ROOT, "train/train_matched.py", argv)
    if status != 0:
        raise SystemExit(f"error: train/train_matched.py failed at budget {name} (exit status {status}); see its output "
                         f"above (the same command again resumes: finished runs are skipped)")
    save_json(record, argv)
    return report


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = build_parser().parse_known_args(argv)
    if args.train_budget_flops is not None:
        raise ConfigError("--train-budget-flops: --budgets sets each run's budget; drop it (or run one budget with "
                          "train/train_matched.py)")
    budgets = scaling.parse_budgets(args.budgets)
    args.embeddings = args.embeddings or str(Path(args.out) / "clip_embeddings")
    report_dir = Path(args.report or Path(args.out) / "report")
    reports = {budget: run_budget(args, rest, budget) for budget in budgets}
    result = {"command": "python train/compare_scaling.py " + shlex.join(argv), **scaling.aggregate(reports)}
    scaling.write_report(report_dir, result)
    print(json.dumps({"verdict": result["verdict"]}))
    print(f"wrote {report_dir / 'report.md'}, {report_dir / 'scaling.json'}, {report_dir / 'scaling.png'} and "
          f"{report_dir / 'scaling_by_objects.png'}")
    return result


if __name__ == "__main__":
    run_cli(main)
