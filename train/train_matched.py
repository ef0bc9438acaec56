#!/usr/bin/env python
"""Train AR (DALL-E) and diffusion (unCLIP) on the same data to the same training FLOPs, then compare them with
sample/compare.py: the matched-budget version of `make compare`.

  python train/train_matched.py --train-budget-flops 5e13 --train-images data/shapes --train-tokens data/tokens \\
      --tokenizer runs/tokenizer --dvae runs/dvae/export --clip runs/clip/export --eval-clip runs/eval_clip/export \\
      --synthetic-prompts 16 ... --out outputs/compare_matched

  AR      the dVAE is given (--dvae, default: the one --train-tokens was encoded with) and its run counts first;
          the transformer (train/train_dalle.py on --train-tokens) gets the rest of F.
  unCLIP  CLIP embeddings of --train-images under --clip (train/precompute_clip.py; the shared CLIP is in neither
          backend's budget); the prior (train/train_prior.py) gets --budget-prior-share of F (default 0.02, the
          split of `make compare`), the decoder (train/train_decoder.py on --train-images) the rest.
Steps per stage = floor(FLOPs for the stage / FLOPs of one of its steps) (metrics.plan_steps). One step is counted
with FlopCounterMode on the model its trainer would build (`<trainer> --dry_run` writes that export config, and
`dalle_ar.models` builds it and runs its example batch and loss), so each backend ends below F by less than one
step of its last stage, and the report's "Matched training budget" table shows the plan next to the FLOPs counted
on the exports. Each stage trains with make compare's recipe (RECIPES below: the demo transformer's settings
with AdamW, compare-models' prior and decoder) followed by --transformer-args / --prior-args / --decoder-args, flags
of that trainer (later flags win), e.g. --decoder-args "--channels 64 --batch_size 64", or --transformer-args
"--optimizer muon --grad_clip 0 --muon_lr 0.01" (make compare-matched and compare-scaling pass the demo transformer's
optimizer, and the caption and Muon to the decoder: --decoder-args "--use_caption --optimizer muon --zero_stage 0
--grad_clip 0 --muon_lr 0.01").

Each trainer runs as its own process (python train/<trainer>.py) under <out>/runs/<stage> (+ <out>/runs/plan.json,
<out>/runs/budget.json). On CPU with 2+ cores the two backends train at once, each process on half the cores (the
unCLIP stages' output goes to <out>/runs/prior.log and decoder.log); --sequential trains one after the other. The
same command again skips finished runs and resumes unfinished ones from their checkpoints; a run made under another
plan is refused, not mixed. The CLIP embeddings go to --embeddings DIR (default <out>/runs/
clip_embeddings): computed there when DIR does not hold all of them, reused when it does (several budgets share one
precompute: train/compare_scaling.py), refused when DIR's meta.json names another --clip or other --train-images. Then
sample/compare.py evaluates the three exports with every other flag given here (--synthetic-prompts, --ar-rerank,
--unclip-steps, ...; see its --help) and writes the report to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dalle_ar import cli, metrics, models
from dalle_ar.checkpoint import WEIGHTS, weights_sha256
from dalle_ar.cli import run_cli
from dalle_ar.config import ConfigError, load_json, save_json
from dalle_ar.data.embeddings import read_meta, reusable
from dalle_ar.data.write import encoded_with_sha256

ROOT = Path(__file__).resolve().parents[1]

# the trainer of each stage and its recipe, `make compare`'s (Makefile targets demo for the transformer,
# compare-models for the prior and decoder); --<stage>-args come after it, so they override it. The transformer's is
# the demo's (lr 2e-3) as one process of the demo's global batch of 32, with AdamW: make compare-matched and
# compare-scaling add the demo transformer's optimizer flags (Muon by default) as --transformer-args, and the
# decoder's caption and optimizer (Muon by default) as --decoder-args.
TRAINERS = {"transformer": "train_dalle", "prior": "train_prior", "decoder": "train_decoder"}
RECIPES = {
    "transformer": "--dim 256 --depth 4 --heads 4 --batch_size 32 --lr 2e-3 --warmup_steps 50",
    "prior": "--dim 128 --depth 2 --batch_size 64 --lr 1e-3 --warmup_steps 20 --ema_decay 0.99 --save_every 0 "
             "--eval_samples 32 --eval_steps 8",
    "decoder": "--image_size 32 --channels 32 --channel_mult 1,2,2 --num_res_blocks 1 --attention_resolutions 8 "
               "--head_channels 32 --batch_size 32 --lr 1e-3 --warmup_steps 50 --ema_decay 0.995 --save_every 0 "
               "--sample_steps 32 --sample_every 500",
}
PLANNED_FLAGS = ("--steps", "--out", "--data", "--tokenizer", "--embeddings", "--stage", "--resume", "--dry_run")


def build_parser() -> argparse.ArgumentParser:
    """This script's flags; every other flag goes to sample/compare.py, which evaluates the trained exports."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # an abbreviation could swallow a compare.py flag
    a = p.add_argument
    a("--train-budget-flops", "--train_budget_flops", dest="train_budget_flops", type=float, required=True,
      help="each backend's training FLOPs, e.g. 5e13")
    a("--train-images", "--train_images", dest="train_images", default=None,
      help="image shards both backends train on (the unCLIP decoder and the CLIP embeddings read them)")
    a("--train-tokens", "--train_tokens", dest="train_tokens", default=None,
      help="token shards of the same images from train/encode.py with --dvae (the AR transformer reads them)")
    a("--tokenizer", default=None, help="tokenizer.json or its directory (train/train_tokenizer.py)")
    a("--dvae", default=None, help="the dVAE export --train-tokens was encoded with (default: the one its meta.json names)")
    a("--embeddings", default=None,
      help="directory of the CLIP embeddings of --train-images under --clip: computed there unless it holds them all "
           "(then reused); refused when made from another --clip or other images (default: <out>/runs/clip_embeddings)")
    a("--budget-prior-share", "--budget_prior_share", dest="budget_prior_share", type=float, default=0.02,
      help="fraction of unCLIP's budget for the prior; the decoder gets the rest (default: 0.02, the split of "
           "`make compare`: prior 500 steps, decoder 1500)")
    for stage in TRAINERS:
        a(f"--{stage}-args", f"--{stage}_args", dest=f"{stage}_args", default="",
          help=f"flags for train/{TRAINERS[stage]}.py after the recipe `{RECIPES[stage]}` (later flags win)")
    # shared with sample/compare.py: read here as well, and passed on
    a("--clip", required=True, help="the CLIP the unCLIP embeddings come from, which also reranks AR candidates")
    a("--eval-clip", "--eval_clip", dest="eval_clip", required=True, help="the evaluator CLIP (see sample/compare.py)")
    a("--out", default="outputs/compare_matched", help="runs in <out>/runs, the report in <out>")
    a("--device", default=None, help="(default: cuda if available, else cpu)")
    a("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    a("--sequential", action="store_true",
      help="train AR's transformer, then unCLIP's prior and decoder, each on every core (default on CPU with 2+ cores: "
           "the two backends at once, each process on half the cores, unCLIP's output in <out>/runs/<stage>.log)")
    # exports are what this script makes: given ones are refused (check_training_inputs)
    a("--ar", default=None, help=argparse.SUPPRESS)
    for name in ("unclip_prior", "unclip_decoder", "unclip_upsampler"):
        a(f"--{name.replace('_', '-')}", f"--{name}", dest=name, default=None, help=argparse.SUPPRESS)
    return p


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's flags, the flags for sample/compare.py)."""
    args, rest = build_parser().parse_known_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args, rest


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def check_training_inputs(args) -> None:
    """The training inputs, and no exports (this script trains them)."""
    given = [flag for flag, value in (("--ar", args.ar), ("--unclip-prior", args.unclip_prior),
                                      ("--unclip-decoder", args.unclip_decoder),
                                      ("--unclip-upsampler", args.unclip_upsampler)) if value]
    if given:
        raise ConfigError(f"--train-budget-flops trains the models itself; drop {', '.join(given)} (or compare those "
                          f"exports with sample/compare.py)")
    missing = [f"--{name.replace('_', '-')}" for name in ("train_images", "train_tokens", "tokenizer")
               if not getattr(args, name)]
    if missing:
        raise ConfigError(f"--train-budget-flops needs {', '.join(missing)}: image shards, their token shards from "
                          f"train/encode.py, and the tokenizer.json of train/train_tokenizer.py")
    if args.train_budget_flops <= 0:
        raise ConfigError(f"--train-budget-flops {args.train_budget_flops:g}: must be > 0, e.g. 5e13")
    if not 0 < args.budget_prior_share < 1:
        raise ConfigError(f"--budget-prior-share {args.budget_prior_share:g}: must be in (0, 1), e.g. 0.02")
    meta = Path(args.train_tokens) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: --train-tokens is not a token shard directory; make one with "
                                f"`python train/encode.py --dvae <dvae export> --data {args.train_images} --out DIR`")
    encoded_with = load_json(meta).get("dvae")
    if args.dvae is None:
        args.dvae = encoded_with
    elif encoded_with and Path(encoded_with).resolve() != Path(args.dvae).resolve() and not same_weights(args):
        raise ConfigError(f"{meta}: the tokens were encoded with {encoded_with}, not --dvae {args.dvae} (other weights); "
                          f"pass that dVAE or re-encode: python train/encode.py --dvae {args.dvae} --data "
                          f"{args.train_images} --out DIR")
    if not args.dvae:
        raise ConfigError(f"{meta} names no dVAE; pass --dvae (the export the tokens were encoded with)")


def same_weights(args) -> bool:
    """Whether --dvae holds the weights the tokens were encoded with, though under another path (a demo directory
    copied or moved since it was encoded)."""
    recorded = encoded_with_sha256(args.train_tokens)
    return bool(recorded) and (Path(args.dvae) / WEIGHTS).is_file() and weights_sha256(args.dvae) == recorded


def stage_argv(args, stage: str, runs: Path, embeddings: Path) -> list[str]:
    """The trainer's command line for one stage, without --steps: data and output paths, the recipe, then
    --<stage>-args."""
    user = shlex.split(getattr(args, f"{stage}_args"))
    for flag in user:
        if flag.split("=")[0].replace("-", "_") in [f.replace("-", "_") for f in PLANNED_FLAGS]:
            raise ConfigError(f"--{stage}-args: {flag.split('=')[0]} is set by train_matched.py (it plans steps, "
                              f"paths and data); drop it")
    if stage == "transformer":
        meta = load_json(Path(args.train_tokens) / "meta.json")
        data = ["--data", args.train_tokens, "--num_image_tokens", str(meta["num_tokens"]),
                "--image_fmap_size", str(meta["grid_size"])]
    elif stage == "prior":
        data = ["--data", str(embeddings)]
    else:
        data = ["--data", args.train_images, "--embeddings", str(embeddings)]
    quiet = ["--no-progress"] if args.no_progress else []
    return [*data, "--tokenizer", args.tokenizer, "--out", str(runs / stage), *shlex.split(RECIPES[stage]), *user, *quiet]


# ------------------------------------------------------------------------------------------------
# planning and training
# ------------------------------------------------------------------------------------------------

def run_script(script: str, argv: list[str], env: dict | None = None, log: Path | None = None) -> int:
    """python <script> argv in its own process, each stage a run of its own (cli.run_script: `env` added to its
    environment, its output into `log` when given); its exit status."""
    return cli.run_script(ROOT, script, argv, env=env, log=log)


def step_flops(stage: str, argv: list[str], plans: Path, device: str) -> int:
    """FLOPs of one optimizer step of the stage as `argv` trains it: the trainer's --dry_run writes the export
    config it would train (and its batch size and accumulation); FlopCounterMode over one micro-batch of that
    model (models.train_step, what the report counts on the export afterwards) x gradient accumulation."""
    out = plans / f"{stage}.json"
    if run_script(f"train/{TRAINERS[stage]}.py", [*argv, "--dry_run", str(out)]) != 0:
        raise SystemExit(f"error: train/{TRAINERS[stage]}.py refused the {stage} flags (its message is above)")
    dry = load_json(out)
    model = models.build(dry["export_config"])
    return metrics.count_flops(models.train_step(model, dry["export_config"], dry["batch_size"], device)) * dry["grad_accum"]


def train_stage(stage: str, argv: list[str], steps: int, env: dict | None = None,
                log: Path | None = None) -> tuple[Path, bool]:
    """Run the stage's trainer for `steps` (`env` added to its environment, its output into `log` when given), or
    skip it when <run> already finished that plan (the trainer itself resumes an unfinished one from its
    checkpoints). Returns (export, trained now)."""
    full = [*argv, "--steps", str(steps)]
    run = Path(full[full.index("--out") + 1])
    export = run / "export"
    record = run / "compare_argv.json"  # the plan this run trains, so a rerun never mixes two plans
    if run.exists() and any(run.iterdir()):
        if not record.exists():
            raise ConfigError(f"{run}: a run train_matched.py did not start; delete it or pass another --out")
        if load_json(record) != full:
            raise ConfigError(f"{run}: trained under another plan or other flags ({record}); delete {run} to retrain, "
                              f"or pass another --out")
        if finished(export, steps):
            print(f"{stage}: {export} already trained for {steps} steps; skipped", flush=True)
            return export, False
    run.mkdir(parents=True, exist_ok=True)
    save_json(record, full)
    where = f"; its output: {log}" if log else ""
    print(f"{stage}: python train/{TRAINERS[stage]}.py {shlex.join(full)}{where}", flush=True)
    status = run_script(f"train/{TRAINERS[stage]}.py", full, env=env, log=log)
    if status != 0:
        if log:
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]), flush=True)
        raise SystemExit(f"error: train/{TRAINERS[stage]}.py failed (exit status {status}); see its output "
                         f"{f'in {log}' if log else 'above'}")
    if not finished(export, steps):  # a trainer stopped by a signal saves a checkpoint and exits 0
        raise SystemExit(f"error: {stage} stopped before step {steps} (checkpoint saved in {run}); run the same command "
                         f"again to resume")
    return export, True


def finished(export: Path, steps: int) -> bool:
    return (export / "model.safetensors").exists() and metrics.run_info(export)["steps"] == steps


def train_matched(args) -> dict:
    """Train AR's transformer and unCLIP's prior + decoder on the same data so that each backend's training FLOPs
    come to --train-budget-flops (the dVAE's counted run is part of AR's; the shared CLIP is in neither), then
    point args.ar / args.unclip_prior / args.unclip_decoder at the exports. Returns the plans."""
    check_training_inputs(args)
    budget, device = args.train_budget_flops, args.device
    runs = Path(args.out) / "runs"
    embeddings, plans = Path(args.embeddings) if args.embeddings else runs / "clip_embeddings", runs / "dry_run"
    reuse = reusable(embeddings, args.clip, args.train_images)  # another CLIP's embeddings fail here, before training
    flag = f"--train-budget-flops {budget:.3g}"

    dvae, dvae_cfg = models.load(args.dvae, device, kind="dvae")
    dvae_run = metrics.stage_training_flops(dvae, args.dvae, dvae_cfg, device)
    del dvae
    if dvae_run["flops"] is None:
        raise ConfigError(f"--dvae {args.dvae}: no training record beside the export ({dvae_run['run']}/"
                          f"train_config.json); its FLOPs count toward AR's budget, so use a dVAE from train/train_dvae.py")
    argv = {"transformer": stage_argv(args, "transformer", runs, embeddings)}
    try:  # AR first: a budget the dVAE alone exhausts stops here, before any CLIP embedding is computed
        ar = metrics.plan_steps(budget, {"transformer": step_flops("transformer", argv["transformer"], plans, device)},
                                spent={"dvae": dvae_run["flops"]})
    except ValueError as e:
        raise ConfigError(f"{flag} (AR: dVAE {args.dvae} + transformer): {e}") from None

    if reuse:
        print(f"clip embeddings: {embeddings} already holds those of {args.train_images} under {args.clip}; reused",
              flush=True)
    elif run_script("train/precompute_clip.py", ["--clip", args.clip, "--data", args.train_images, "--out",
                                                 str(embeddings), "--num_workers", "0", "--device", device]) != 0:
        raise SystemExit("error: train/precompute_clip.py failed; see its output above")
    tokens, images = load_json(Path(args.train_tokens) / "meta.json"), read_meta(embeddings)
    if tokens["num_samples"] != images["num_samples"]:
        raise ConfigError(f"--train-tokens {args.train_tokens} holds {tokens['num_samples']} samples, --train-images "
                          f"{args.train_images} {images['num_samples']}: both backends must train on the same data; "
                          f"encode those shards: python train/encode.py --dvae {args.dvae} --data {args.train_images}")
    for stage in ("prior", "decoder"):
        argv[stage] = stage_argv(args, stage, runs, embeddings)
    try:
        unclip = metrics.plan_steps(budget, {s: step_flops(s, argv[s], plans, device) for s in ("prior", "decoder")},
                                    shares={"prior": args.budget_prior_share})
    except ValueError as e:
        raise ConfigError(f"{flag} --budget-prior-share {args.budget_prior_share:g} (unCLIP): {e}") from None

    planned = {"ar": ar, "unclip": unclip}
    (runs / "plan.json").write_text(json.dumps({"budget_flops": budget, **planned}, indent=2))
    for backend, plan in planned.items():
        print(f"{backend}: budget {budget:.4g} FLOPs = " + " + ".join(
            [f"{name} {f:.4g} (trained)" for name, f in plan["spent"].items()]
            + [f"{name} {p['steps']} steps x {p['flops_per_step']:.4g}" for name, p in plan["stages"].items()])
              + f" + {plan['left']:.3g} left", flush=True)
    threads = concurrent_threads(args)
    exports = train_backends(planned, argv, runs, threads)
    args.ar, args.unclip_prior, args.unclip_decoder = (str(exports[s]) for s in ("transformer", "prior", "decoder"))
    return {"budget_flops": budget, "prior_share": args.budget_prior_share, "runs": str(runs),
            "embeddings": str(embeddings), "embeddings_computed": not reuse, "images": args.train_images,
            "tokens": args.train_tokens, "concurrent_threads": threads, **planned}


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def concurrent_threads(args) -> int | None:
    """Threads per process when the two backends train at once (on CPU with 2+ cores, unless --sequential): half
    the cores each. On the 2-core CPU one thread per process trains as fast as two threads for one process, so the
    two backends take about the time of the longer one instead of the sum. None: one backend after the other."""
    if args.sequential or args.device != "cpu" or cores() < 2:
        return None
    return cores() // 2


def train_backends(planned: dict, argv: dict, runs: Path, threads: int | None) -> dict[str, Path]:
    """Train every planned stage (AR: the transformer; unCLIP: the prior, then the decoder) and record in each plan
    its run, flags and whether it trained now; the exports by stage. With `threads`, the backends train at once,
    each process on that many threads: AR's output on the terminal, each unCLIP stage's in <runs>/<stage>.log;
    when one backend fails the other still finishes (a rerun skips it), then the failure is raised."""
    def train(backend: str, log: bool) -> dict[str, Path]:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else None
        out = {}
        for stage, p in planned[backend]["stages"].items():
            out[stage], p["trained_now"] = train_stage(stage, argv[stage], p["steps"], env=env,
                                                       log=runs / f"{stage}.log" if log else None)
            p["run"], p["argv"] = str(out[stage].parent), argv[stage]
        return out

    if threads is None:
        return {**train("ar", log=False), **train("unclip", log=False)}
    print(f"training AR and unCLIP at once, {threads} thread(s) per process (--sequential: one after the other); "
          f"unCLIP's progress: tail -f {runs}/prior.log {runs}/decoder.log", flush=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        unclip = pool.submit(train, "unclip", True)
        try:
            ar = train("ar", log=False)
        finally:
            unclip_error = unclip.exception()  # waits for unCLIP's stages whatever happened to AR's
        if unclip_error is not None:
            raise unclip_error
    return {**ar, **unclip.result()}


def main(argv=None) -> dict:
    args, compare_argv = parse(argv)
    shared = ["--clip", args.clip, "--eval-clip", args.eval_clip]
    if run_script("sample/compare.py", [*compare_argv, *shared, "--check-flags"]) != 0:  # bad inputs fail before training
        raise SystemExit("error: sample/compare.py refused the evaluation flags (its message is above)")
    metrics.check_evaluator(args.eval_clip, [args.clip])
    budget = train_matched(args)
    budget_file = Path(args.out) / "runs" / "budget.json"
    budget_file.write_text(json.dumps(budget, indent=2))
    evaluate = [*compare_argv, *shared, "--ar", args.ar, "--dvae", args.dvae, "--unclip-prior", args.unclip_prior,
                "--unclip-decoder", args.unclip_decoder, "--out", args.out, "--device", args.device,
                "--train-budget", str(budget_file), *(["--no-progress"] if args.no_progress else [])]
    print(f"evaluating: python sample/compare.py {shlex.join(evaluate)}", flush=True)
    if run_script("sample/compare.py", evaluate) != 0:
        raise SystemExit("error: sample/compare.py failed on the trained exports; see its output above (the runs are "
                         "finished: the same command again only evaluates)")
    return load_json(Path(args.out) / "report.json")


if __name__ == "__main__":
    run_cli(main)
