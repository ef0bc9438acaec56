#!/usr/bin/env python
"""AR (DALL-E: dVAE + transformer + CLIP rerank) versus diffusion (unCLIP: prior + decoder) on the same
held-out prompts with the same seeds: quality, diversity and cost, in one report.

  python sample/compare.py --ar runs/dalle/export --unclip-prior runs/prior/export \\
      --unclip-decoder runs/decoder/export --clip runs/clip/export --eval-clip runs/eval_clip/export \\
      --synthetic-prompts 32 --samples-per-prompt 4 --seed 0 \\
      --ar-rerank 1,4,16 --ar-temperature 1.0,0.7 --unclip-guidance 1,3 --unclip-steps 16,64 --out outputs/compare

Each sweep setting gives K = --samples-per-prompt kept images per prompt. AR with rerank N draws N candidates
for each kept image and keeps the one the --clip CLIP scores highest (paper section 2.6), so its cost per kept
image is N candidates. unCLIP conditions on the same --clip (its prior and decoder were trained on its
embeddings); each kept image is one prior sample (best of the pipeline's 2 prior candidates) + one decoder sample.

Metrics, all under --eval-clip, a CLIP that must differ from --clip (a model scored by the CLIP it was
reranked or conditioned with would grade its own homework; the script refuses):
  clip_score       100 * max(cos(image, prompt), 0), mean over kept images (CLIPScore, w = 100)
  fd, kid          Frechet distance and KID (unbiased, cubic kernel) of image features against --real-images
                   held-out real shapes-world images (a different world seed than the prompts' renders)
  diversity        mean pairwise cosine distance (1 - cos) among the K kept images of a prompt, over prompts
  caption_accuracy shapes-world prompts: fraction of kept images that `synthetic.check` accepts from pixels;
                   caption_accuracy_by_objects: the same per number of shapes the prompt names ("1", "2")
With --bootstrap B percentile 95% intervals: over prompts for clip_score / diversity / caption_accuracy,
over generated images for fd / kid. The row `real` scores held-out real renders of the same captions (the
ceiling) and fd of a second real set (the noise floor at this sample size).

Cost: parameters by stage; training FLOPs = torch FlopCounterMode over one real training step of each stage
(forward + backward at the run's batch size) x the steps the run logged (metrics.jsonl, else train_config.json) x
the data-parallel ranks it recorded (train_config.json's world_size); seconds per kept image at batch 1 and at
--batch-size (on CUDA halved until it fits: the largest batch tried); network evaluations per kept image:
`nfe_calls` sequential forward passes (AR: N x image_seq_len decode steps, guidance rows in the same call; unCLIP:
prior steps + decoder steps [+ upsampler steps]) and `nfe_rows` batch rows (x2 wherever a guidance scale is not 1;
AR: N x image_seq_len; unCLIP: prior steps x 2 candidates + decoder steps [+ upsampler steps]). Same device for
both; on CUDA the AR transformer runs in bf16 (dalle_ar/pipeline.py) and unCLIP under bf16 autocast; fp32 on CPU.

Outputs in --out: report.md (tables, plots), report.json, quality_vs_training_flops.png,
quality_vs_seconds.png (Pareto front), clip_score_vs_diversity.png, side_by_side.png (per prompt an AR row
and an unCLIP row: each backend's best setting by clip_score), samples/<setting>.png.

Matched training budget: train/train_matched.py trains both backends to the same training FLOPs, then runs this
script on its exports with --train-budget <its budget.json>, which adds the plan next to the counted FLOPs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dalle_ar import comparison, metrics, models
from dalle_ar.cli import run_cli
from dalle_ar.clip import ClipScorer, clip_score, load_clip
from dalle_ar.config import ConfigError, SampleConfig, load_json
from dalle_ar.data import synthetic
from dalle_ar.pipeline import DallePipeline
from dalle_ar.report import device_name, save_grid
from dalle_ar.unclip.pipeline import UnclipPipeline


def floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ar", default=None, help="DALL-E transformer export (train/train_dalle.py <out>/export); required")
    a("--dvae", default=None, help="dVAE export (default: the one named in the transformer's config.json)")
    a("--unclip-prior", "--unclip_prior", dest="unclip_prior", default=None,
      help="prior export (train/train_prior.py); required")
    a("--unclip-decoder", "--unclip_decoder", dest="unclip_decoder", default=None,
      help="decoder export (train/train_decoder.py); required")
    a("--unclip-upsampler", "--unclip_upsampler", dest="unclip_upsampler", default=None, help="optional upsampler export")
    a("--clip", required=True, help="the CLIP used for AR reranking and unCLIP conditioning (export dir or ARCH:/weights)")
    a("--eval-clip", "--eval_clip", dest="eval_clip", required=True,
      help="the evaluator CLIP for every metric: a different model than --clip (e.g. train/train_clip.py --seed 1 "
           "with another width)")
    a("--prompts", default=None, help="text file, one prompt per line (added to --synthetic-prompts)")
    a("--synthetic-prompts", "--synthetic_prompts", dest="synthetic_prompts", type=int, default=32,
      help="held-out shapes-world captions (default: 32)")
    a("--synthetic-seed", "--synthetic_seed", dest="synthetic_seed", type=int, default=synthetic.HELDOUT_SEED,
      help="world seed of the held-out prompts (default: %(default)s, synthetic.HELDOUT_SEED, as sample/generate.py)")
    a("--real-images", "--real_images", dest="real_images", type=int, default=512,
      help="held-out real images for fd/kid (world seed --synthetic-seed + 1; default: 512)")
    a("--samples-per-prompt", "--samples_per_prompt", dest="samples_per_prompt", type=int, default=4,
      help="kept images per prompt and setting, K >= 2 for diversity (default: 4)")
    a("--seed", type=int, default=0, help="sampling seed, the same for every setting (default: 0)")
    a("--ar-rerank", "--ar_rerank", dest="ar_rerank", default="1,4,16", help="AR candidates per kept image N (default: 1,4,16)")
    a("--ar-temperature", "--ar_temperature", dest="ar_temperature", default="1.0", help="(default: 1.0)")
    a("--ar-top-k", "--ar_top_k", dest="ar_top_k", default="0", help="AR top-k token filter, 0 = off (default: 0)")
    a("--ar-cond-scale", "--ar_cond_scale", dest="ar_cond_scale", default="1", help="AR guidance scales (default: 1)")
    a("--unclip-guidance", "--unclip_guidance", dest="unclip_guidance", default="1,3",
      help="unCLIP decoder guidance scales (default: 1,3)")
    a("--unclip-prior-guidance", "--unclip_prior_guidance", dest="unclip_prior_guidance", type=float, default=1.0,
      help="prior guidance scale (default: 1)")
    a("--unclip-steps", "--unclip_steps", dest="unclip_steps", default="16,64",
      help="DDIM steps of the prior and the decoder (default: 16,64)")
    a("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
      help="rows per forward for the sweep, and the large batch timed (default: 64)")
    a("--timing-images", "--timing_images", dest="timing_images", type=int, default=2,
      help="kept images generated at batch 1 to time it (default: 2)")
    a("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals, 0 = none (default: 1000)")
    a("--out", default="outputs/compare/report", help="output directory (default: outputs/compare/report)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    a("--train-budget", "--train_budget", dest="train_budget", default=None,
      help="budget.json of train/train_matched.py, which trained the exports: adds the plan per stage next to the "
           "FLOPs counted here")
    a("--check-flags", "--check_flags", dest="check_flags", action="store_true",
      help="check the flags and prompts, then exit (train/train_matched.py does so before it trains)")
    return p


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def check_exports(args) -> None:
    """The three exports are there."""
    exports = {"--ar": args.ar, "--unclip-prior": args.unclip_prior, "--unclip-decoder": args.unclip_decoder}
    missing = [flag for flag, value in exports.items() if not value]
    if missing:
        raise ConfigError(f"{', '.join(missing)} missing: pass the trained exports, or train both backends to one "
                          f"budget with train/train_matched.py --train-budget-flops F")


def read_prompts(args) -> tuple[list[str], list[torch.Tensor | None]]:
    """Prompts and, for the synthetic ones, their held-out real render (None for file prompts)."""
    prompts, reals = [], []
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompts file not found; pass a text file with one prompt per line")
        file_prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        prompts += file_prompts
        reals += [None] * len(file_prompts)
    for i in range(args.synthetic_prompts):
        image, caption = synthetic.make_example(i, seed=args.synthetic_seed)
        prompts.append(caption)
        reals.append(comparison.to_tensor(image))
    if not prompts:
        raise ConfigError("no prompts: pass --synthetic-prompts N and/or --prompts FILE")
    return prompts, reals


# ------------------------------------------------------------------------------------------------
# the two backends: K kept images per prompt for one setting
# ------------------------------------------------------------------------------------------------

def generate_ar(args, setting: dict, prompts: list[str], k: int, pipe: DallePipeline, rerank: ClipScorer,
                batch_size: int) -> tuple:
    """(P, K, 3, H, W) kept images: K groups of N candidates per prompt, the rerank CLIP's best of each group."""
    n = setting["rerank"]
    cfg = SampleConfig(num_candidates=k * n, top_k_rerank=k, temperature=setting["temperature"], top_k=setting["top_k"],
                       cond_scale=setting["cond_scale"], batch_size=batch_size, seed=args.seed)
    out = pipe(prompts, cfg)
    images = out["images"]  # (P, K*N, 3, H, W)
    kept = []
    for prompt, cands in zip(prompts, images):
        groups = cands.view(k, n, *cands.shape[1:])
        if n == 1:
            kept.append(groups[:, 0])
            continue
        cos = rerank.scores(cands, [prompt])[:, 0].view(k, n).cpu()
        kept.append(groups[torch.arange(k), cos.argmax(1)])
    return torch.stack(kept), out["seconds"]


def generate_unclip(args, setting: dict, prompts: list[str], k: int, pipe: UnclipPipeline, batch_size: int) -> tuple:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(args.device).startswith("cuda") else nullcontext()
    start = time.perf_counter()
    with autocast:
        images = pipe.generate(prompts, k, seed=args.seed, prior_steps=setting["steps"], decoder_steps=setting["steps"],
                               prior_guidance=args.unclip_prior_guidance, decoder_guidance=setting["guidance"],
                               batch_size=batch_size, prior_candidates=comparison.PRIOR_CANDIDATES)
    sync(args.device)
    return images.float(), time.perf_counter() - start


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def with_fitting_batch(fn, batch_size: int, device) -> tuple:
    """fn(batch_size); on a CUDA out-of-memory error halve the batch and retry. Returns (result, batch used)."""
    while True:
        try:
            return fn(batch_size), batch_size
        except torch.OutOfMemoryError:
            if batch_size == 1 or not str(device).startswith("cuda"):
                raise
            torch.cuda.empty_cache()
            batch_size //= 2


def settings(args) -> list[dict]:
    out = []
    for n, t, tk, cs in itertools.product(ints(args.ar_rerank), floats(args.ar_temperature), ints(args.ar_top_k),
                                          floats(args.ar_cond_scale)):
        name = f"AR N={n} T={t:g}" + (f" top-k={tk}" if tk else "") + (f" cfg={cs:g}" if cs != 1 else "")
        out.append({"backend": "ar", "setting": name, "rerank": n, "temperature": t, "top_k": tk, "cond_scale": cs})
    for g, s in itertools.product(floats(args.unclip_guidance), ints(args.unclip_steps)):
        out.append({"backend": "unclip", "setting": f"unCLIP g={g:g} steps={s}", "guidance": g, "steps": s})
    return out


# ------------------------------------------------------------------------------------------------
# metrics and cost
# ------------------------------------------------------------------------------------------------

def backend_cost(args, device: str) -> dict:
    """Parameters by stage and training FLOPs per backend (CLIP listed apart: both backends use the same one)."""
    dalle_cfg = load_json(Path(args.ar) / "config.json")
    dvae_dir = args.dvae or dalle_cfg.get("dvae")
    stages = {"ar": {"transformer": args.ar, "dvae": dvae_dir},
              "unclip": {"prior": args.unclip_prior, "decoder": args.unclip_decoder}}
    if args.unclip_upsampler:
        stages["unclip"]["upsampler"] = args.unclip_upsampler
    out = {}
    for backend, parts in stages.items():
        params, flops = {}, {}
        for stage, path in parts.items():
            model, cfg = models.load(path, device)  # fp32 copy: counted, never sampled from
            params[stage] = metrics.count_params({stage: model})[stage]
            flops[stage] = metrics.stage_training_flops(model, path, cfg, device)
            del model
        total = [f["flops"] for f in flops.values()]
        out[backend] = {"params": {**params, "total": sum(params.values())}, "training": flops,
                        "training_flops": sum(total) if all(t is not None for t in total) else None}
    clip_model, _ = load_clip(args.clip, device)
    out["clip"] = {"params": metrics.count_params({"clip": clip_model})["clip"],
                   "training": metrics.stage_training_flops(clip_model, args.clip, load_json(Path(args.clip) / "config.json"),
                                                            device) if (Path(args.clip) / "config.json").exists() else None,
                   "note": "shared: reranks AR candidates and conditions unCLIP; not in either backend's totals"}
    return out


def time_batch1(args, setting, prompts, k, rerank, ar: DallePipeline, unclip: UnclipPipeline) -> float:
    """Seconds per kept image with batch 1 (AR: the N candidates of one kept image one after another)."""
    n_images = max(1, args.timing_images)
    prompt = prompts[:1]
    if setting["backend"] == "ar":
        _, seconds = generate_ar(args, setting, prompt, n_images, ar, rerank, batch_size=1)
    else:
        _, seconds = generate_unclip(args, setting, prompt, n_images, unclip, batch_size=1)
    return seconds / n_images


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    k = args.samples_per_prompt
    if k < 2:
        p.error("--samples-per-prompt must be >= 2 (diversity compares a prompt's samples with each other)")
    device = args.device
    prompts, reals = read_prompts(args)
    if args.check_flags:
        return {}
    check_exports(args)
    plan = load_json(args.train_budget) if args.train_budget else None
    prior_cfg = load_json(Path(args.unclip_prior) / "config.json")
    cond_clip = prior_cfg.get("clip")
    metrics.check_evaluator(args.eval_clip, [args.clip] + ([cond_clip] if cond_clip else []))
    if cond_clip and Path(cond_clip).resolve() != Path(args.clip).resolve():
        print(f"warning: the prior was trained on embeddings of {cond_clip}, not --clip {args.clip}")
    torch.manual_seed(args.seed)

    checkable = [synthetic.is_caption(x) for x in prompts]
    rerank = ClipScorer.load(args.clip, device)
    evaluator = ClipScorer.load(args.eval_clip, device)
    ar = DallePipeline.load(args.ar, dvae=args.dvae, device=device)
    pipe = UnclipPipeline.load(args.unclip_prior, args.unclip_decoder, args.clip, device, args.unclip_upsampler)

    text_feats = evaluator.encode_texts(prompts).cpu()
    real_images, _ = comparison.real_set(args.real_images, args.synthetic_seed + 1)
    real_feats = evaluator.encode_images(real_images).cpu().double().numpy()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows, kept = [], {}
    sweep = settings(args)
    for setting in tqdm(sweep, desc="settings", unit="setting", disable=args.no_progress):
        if setting["backend"] == "ar":
            (images, seconds), used = with_fitting_batch(
                lambda b: generate_ar(args, setting, prompts, k, ar, rerank, b), args.batch_size, device)
        else:
            (images, seconds), used = with_fitting_batch(
                lambda b: generate_unclip(args, setting, prompts, k, pipe, b), args.batch_size, device)
        kept[setting["setting"]] = images
        row = {**setting, "batch_size": used, "seconds_per_image": seconds / (len(prompts) * k),
               "seconds_per_image_batch1": time_batch1(args, setting, prompts, k, rerank, ar, pipe),
               **comparison.nfe(setting, ar.transformer.config.image_seq_len, args.unclip_upsampler is not None,
                               args.unclip_prior_guidance),
               **comparison.score(images, prompts, evaluator, text_feats, real_feats, checkable, args.bootstrap)}
        rows.append(row)
        save_grid(images.flatten(0, 1), out / "samples" / f"{slug(setting['setting'])}.png", nrow=k,
                  row_labels=prompts)
        print(json.dumps({x: row[x] for x in ("setting", "clip_score", "caption_accuracy", "fd", "kid", "diversity",
                                              "seconds_per_image") if x in row}), flush=True)

    # the real renders of the prompts: the ceiling; a second real set: FD / KID's floor at this sample size
    real_rows = [i for i, r in enumerate(reals) if r is not None]
    real = {}
    if real_rows:
        rimg = torch.stack([reals[i] for i in real_rows])
        rfeat = evaluator.encode_images(rimg).cpu()
        rcs = clip_score((rfeat * text_feats[real_rows]).sum(-1)).numpy()
        acc = np.array(synthetic.check_batch(rimg, [prompts[i] for i in real_rows]), dtype=float)
        real.update(clip_score=round(float(rcs.mean()), 3), clip_score_ci=comparison.interval(rcs, np.mean, args.bootstrap, 6),
                    caption_accuracy=round(float(acc.mean()), 4), caption_accuracy_ci=comparison.interval(acc, np.mean, args.bootstrap, 7),
                    caption_accuracy_by_objects=comparison.accuracy_by_objects(acc, [prompts[i] for i in real_rows],
                                                                               args.bootstrap, 20))
    else:
        real.update(clip_score=None, clip_score_ci=None)
    floor_images, _ = comparison.real_set(len(prompts) * k, args.synthetic_seed + 2)
    floor_feats = evaluator.encode_images(floor_images).cpu().double().numpy()
    real["fd_floor"] = round(metrics.frechet_distance(floor_feats, real_feats), 5)
    real["kid_floor"] = round(metrics.kid(floor_feats, real_feats, 50, min(len(floor_feats), len(real_feats), 1000), 3)[0], 6)

    best = {b: max((r for r in rows if r["backend"] == b), key=lambda r: r["clip_score"])["setting"]
            for b in ("ar", "unclip")}
    side, labels = [], []
    size = kept[best["ar"]].shape[-1]
    for i, prompt in enumerate(prompts[:8]):
        for b in ("ar", "unclip"):
            im = kept[best[b]][i]
            if im.shape[-1] != size:  # unCLIP's decoder may work at another resolution than the dVAE
                im = F.interpolate(im, size=(size, size), mode="nearest")
            side.append(im)
            labels.append(f"{'AR' if b == 'ar' else 'unCLIP'}: {prompt}")
    save_grid(torch.cat(side), out / "side_by_side.png", nrow=k, row_labels=labels)

    cuda = str(device).startswith("cuda")
    cost = backend_cost(args, device)
    report = {
        "title": f"{len(prompts)} held-out prompts" + (" (shapes world)" if all(checkable) else ""),
        "command": "python sample/compare.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "device": device_name(device), "precision": "bf16 (AR weights, unCLIP autocast)" if cuda else "fp32",
        "timing_note": "" if cuda else "CPU timings: noisy when the machine is shared; compare ratios, not absolutes.",
        "num_prompts": len(prompts), "samples_per_prompt": k, "seed": args.seed, "batch_size": args.batch_size,
        "num_real": args.real_images, "clip": args.clip, "eval_clip": args.eval_clip,
        "models": {"ar": args.ar, "dvae": args.dvae or load_json(Path(args.ar) / "config.json").get("dvae"),
                   "unclip_prior": args.unclip_prior, "unclip_decoder": args.unclip_decoder,
                   "unclip_upsampler": args.unclip_upsampler},
        "cost": cost, "settings": rows, "real": real, "best": best, "prompts": prompts,
        "train_budget": comparison.budget_summary(plan, cost) if plan else None,
    }
    comparison.write_report(out, report)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, plots and {out / 'side_by_side.png'}")
    return report


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text).strip("_")


if __name__ == "__main__":
    run_cli(main)
