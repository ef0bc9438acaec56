#!/usr/bin/env python
"""Caption accuracy on held-out shapes-world prompts (synthetic.check on the pixels) for: no rerank,
CLIP top-1 of 8 and of 32, likelihood top-1 of 8 and of 32 -- with and without classifier-free guidance.

  python -m bench.rerank_accuracy --dalle outputs/cfg_dalle/export --clip outputs/demo/runs/clip/export \\
      --prompts 64 --candidates 32 --cond-scales 1,3 --out bench/results/rerank_accuracy_tiny_cpu.json

Each prompt gets `--candidates` samples per guidance scale; "top-1 of n" ranks the first n of them, "no
rerank" is the mean over all candidates (the accuracy of an unranked pick). Prints one JSON object with
a markdown table under "table".

Several CLIPs (`--clip A --clip B`) rank the same candidates, so reranker recipes are compared on what they will
face; each also gets `pairwise` over all candidates (`evaluation.caption_report`: how often it puts a correct
candidate above a wrong one, by what the wrong one gets wrong). `--first_prompt 64` takes held-out prompts after the
demo's 64 (a development set: choose a recipe there, report it on the 64). `--contrast` also ranks by each CLIP as a
classifier over the caption and every caption wrong in one attribute (`ClipScorer.caption_logprob` over
`synthetic.variants`; "<clip>_contrast"), which prefers the candidate that fits its caption and none of the near misses:

  python -m bench.rerank_accuracy --dalle outputs/demo/runs/dalle/export --clip outputs/demo/runs/clip/export \\
      --clip runs/clip_b/export --first_prompt 64 --prompts 128 --candidates 16 --top-of 16 --cond-scales 1 \\
      --temperature 0.7
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from bench.common import emit
from dalle_ar.clip import ClipScorer, best_first
from dalle_ar.data import synthetic
from dalle_ar.evaluation import caption_report
from dalle_ar.pipeline import DallePipeline
from dalle_ar.report import device_name


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle", required=True, help="transformer export (trained with --null_cond_prob > 0 for guidance)")
    p.add_argument("--dvae", default=None, help="dVAE export (default: the transformer's)")
    p.add_argument("--clip", required=True, action="append",
                   help="CLIP export directory or ARCH:/local/weights (repeat to compare CLIPs on the same candidates)")
    p.add_argument("--prompts", type=int, default=64, help="held-out shapes-world prompts")
    p.add_argument("--first_prompt", type=int, default=0,
                   help="index of the first held-out prompt (64: a development set disjoint from the demo's 64)")
    p.add_argument("--synthetic_seed", type=int, default=synthetic.HELDOUT_SEED, help="world seed of the prompts (not a training seed)")
    p.add_argument("--candidates", type=int, default=32)
    p.add_argument("--top-of", "--top_of", dest="top_of", default="8,32", help="rerank pools (first n candidates)")
    p.add_argument("--cond-scales", "--cond_scales", dest="cond_scales", default="1,3")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--contrast", action="store_true",
                   help="also rank by log p(caption | image) among the caption and its one-attribute variants")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    pools = [int(n) for n in args.top_of.split(",")]
    if max(pools) > args.candidates:
        p.error(f"--top-of {args.top_of}: pools larger than --candidates {args.candidates}")

    pipe = DallePipeline.load(args.dalle, dvae=args.dvae, device=args.device)
    scorers = {spec: ClipScorer.load(spec, args.device) for spec in args.clip}
    names = {spec: "clip" if len(args.clip) == 1 else f"clip{k}" for k, spec in enumerate(args.clip)}
    first = args.first_prompt
    prompts = [synthetic.make_example(i, seed=args.synthetic_seed)[1] for i in range(first, first + args.prompts)]
    N = args.candidates
    results, pairwise, start = {}, {}, time.perf_counter()
    for scale in (float(s) for s in args.cond_scales.split(",")):
        text = pipe.encode(prompts, N)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        rows = args.batch_size // (2 if scale != 1 else 1)
        chunks = pipe.sample_chunks(text, rows, gen, temperature=args.temperature, top_k=args.top_k, cond_scale=scale)
        codes = torch.cat(list(tqdm(chunks, total=len(text.split(rows)), desc=f"cond_scale {scale:g}")))
        images = pipe.decode(codes, args.batch_size)
        ll = pipe.likelihood(text, codes, args.batch_size).cpu().view(len(prompts), N)
        images = images.view(len(prompts), N, *images.shape[1:])
        scores = {names[spec]: torch.stack([scorer.scores(cands, [prompt])[:, 0].cpu()
                                            for prompt, cands in zip(prompts, images)])
                  for spec, scorer in scorers.items()}
        if args.contrast:
            scores.update({f"{names[spec]}_contrast": torch.stack([
                scorer.caption_logprob(cands, prompt, [c for _, c in synthetic.variants(prompt)]).cpu()
                for prompt, cands in zip(prompts, images)]) for spec, scorer in scorers.items()})
        scores["likelihood"] = ll
        report = caption_report(images, prompts, {name: torch.stack([best_first(s) for s in score])
                                                  for name, score in scores.items()})
        passed = torch.tensor(report["check"], dtype=torch.float)
        row = {"no_rerank": round(float(passed.mean()), 4), "oracle": round(report["oracle"], 4)}
        for n in pools:
            for name, score in scores.items():
                best = score[:, :n].argmax(1)
                row[f"{name}_top1_of_{n}"] = round(float(passed[torch.arange(len(prompts)), best].mean()), 4)
        results[f"cond_scale={scale:g}"] = row
        pairwise[f"cond_scale={scale:g}"] = report["pairwise"]

    columns = list(next(iter(results.values())))
    table = ["| | " + " | ".join(c.replace("_", " ") for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {k.replace('=', ' ')} | " + " | ".join(f"{100 * v[c]:.1f}%" for c in columns) + " |"
              for k, v in results.items()]
    result = {"bench": "rerank_accuracy", "device": device_name(args.device), "dalle": args.dalle, "clip": args.clip,
              "null_cond_prob": pipe.transformer.config.null_cond_prob, "prompts": len(prompts), "candidates": N,
              "clips": names, "contrast": args.contrast, "first_prompt": first, "temperature": args.temperature, "top_k": args.top_k,
              "seed": args.seed, "results": results, "pairwise": pairwise,
              "seconds": round(time.perf_counter() - start, 1), "table": "\n".join(table)}
    print("\n".join(table))
    return emit(result, args.out)


if __name__ == "__main__":
    main()
