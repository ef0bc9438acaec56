#!/usr/bin/env python
"""Check image shards or token shards before training: read every sample the way training does and report
what is used, what is converted and what is skipped, by reason, per shard and in total.

  python train/validate_shards.py data/laion --image_size 256 --tokenizer runs/tokenizer --json report.json
  python train/validate_shards.py data/tokens --tokenizer runs/tokenizer     # token shards (train/encode.py)

Prints one line per problem (`SHARD KEY: reason (detail)`, the first --show of them), a table of skip
reasons, caption size statistics and, with --tokenizer, the captions longer than --text_len tokens (kept
and truncated in training). For image shards: the image modes and formats that get converted and image
sizes. Token shards (found by their `.codes.npy` members or a meta.json from encode.py) are checked
against the grid and codebook in meta.json (or --grid_size / --num_tokens), as training checks them, and
the report shows the grids and how many codes of the codebook occur. Exits 1 when a shard is unreadable,
truncated or empty, or more than --max_skip_fraction of the samples would be skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from functools import partial
from multiprocessing import get_context

import numpy as np
from tqdm import tqdm

from dalle_ar.cli import run_cli
from dalle_ar.config import ConfigError, DalleConfig, TrainConfig, load_json, save_json
from dalle_ar.data.decode import (IMAGE_MEMBERS, MAX_PIXELS, MIN_IMAGE_SIZE, NOTES, SHARD_REASONS, SKIP_REASONS,
                                  SkipCounter, SkipSample, decode_sample, decode_token_sample, image_to_uint8)
from dalle_ar.data.read import shard_samples, shard_urls
from dvae.config import DVAEConfig

FORMAT_EXTS = {"JPEG": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",), "BMP": ("bmp",), "GIF": ("gif",),
               "TIFF": ("tif", "tiff")}


def validate_shard(url: str, image_size: int, min_image_size: int, max_pixels: int, tokenizer: str | None,
                   text_len: int) -> dict:
    """Everything about one shard, as plain data (it crosses process boundaries)."""
    skips = SkipCounter(record=True, source=url)
    modes, formats, wrong_ext, icc = Counter(), Counter(), 0, 0
    widths, heights, captions = [], [], []
    ok = 0
    for sample in shard_samples(url, skips):
        skips.saw()
        try:
            image, (w, h), text = decode_sample(sample, image_size, min_image_size, max_pixels)
            image_to_uint8(image, image_size)  # the conversion training does, so its failures show here too
        except SkipSample as s:
            skips.skip(s.reason, url, sample["__key__"], s.detail)
            continue
        except Exception as e:
            skips.skip("other", url, sample["__key__"], f"{type(e).__name__}: {e}")
            continue
        ok += 1
        ext = next(e for e in IMAGE_MEMBERS if e in sample)
        modes[image.mode] += 1
        formats[image.format or "?"] += 1
        wrong_ext += ext not in FORMAT_EXTS.get(image.format, (ext,))
        icc += bool(image.info.get("icc_profile"))
        widths.append(w)
        heights.append(h)
        captions.append(text)
    return {"shard": url, "ok": ok, "modes": dict(modes), "formats": dict(formats), "wrong_extension": wrong_ext,
            "icc_profiles": icc,
            "upscaled": sum(min(w, h) < image_size for w, h in zip(widths, heights)),
            "widths": widths, "heights": heights, **caption_report(skips, captions, tokenizer, text_len)}


def validate_token_shard(url: str, grid: int | None, num_tokens: int | None, tokenizer: str | None,
                         text_len: int) -> dict:
    """The same for a token shard: what `token_dataset` (training) keeps and skips, the grids, the codes."""
    skips = SkipCounter(record=True, source=url)
    grids, used, captions = Counter(), set(), []
    for sample in shard_samples(url, skips):
        skips.saw()
        try:
            codes, text = decode_token_sample(sample, grid, num_tokens)
        except SkipSample as s:
            skips.skip(s.reason, url, sample["__key__"], s.detail)
            continue
        grids["x".join(map(str, codes.shape))] += 1
        used.update(np.unique(codes).tolist())
        captions.append(text)
    return {"shard": url, "ok": len(captions), "grids": dict(grids), "codes_used": sorted(used),
            **caption_report(skips, captions, tokenizer, text_len)}


def caption_report(skips: SkipCounter, captions: list[str], tokenizer: str | None, text_len: int) -> dict:
    """Caption lengths (characters; tokens with a tokenizer, noting those over text_len) and the skip counts."""
    tokens = []
    if tokenizer and captions:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer)
        tokens = [len(e.ids) for e in tok.encode_batch(captions)]
        long = sum(n > text_len for n in tokens)
        if long:
            skips.note("long_caption", long)
    return {"seen": skips.seen, "skipped": skips.counts, "notes": skips.notes,
            "caption_chars": [len(c) for c in captions], "caption_tokens": tokens,
            "problems": [list(p) for p in skips.problems]}


def token_layout(data: str, urls: list[str], grid: int | None, num_tokens: int | None) -> tuple[bool, int | None, int | None]:
    """(token shards?, grid, codebook size): token shards have a meta.json from encode.py beside them or
    `.codes.npy` members; flags win over meta.json."""
    meta_path = os.path.join(data, "meta.json") if os.path.isdir(data) else None
    meta = load_json(meta_path) if meta_path and os.path.exists(meta_path) else {}
    tokens = "grid_size" in meta
    if not tokens:
        for url in urls:  # the first sample of the first readable shard decides
            sample = next(iter(shard_samples(url, SkipCounter())), None)
            if sample is not None:
                tokens = "codes.npy" in sample
                break
    if not tokens and (grid or num_tokens):
        raise ConfigError(f"{data}: --grid_size/--num_tokens are for token shards, and these hold images; drop them")
    return tokens, grid or meta.get("grid_size"), num_tokens or meta.get("num_tokens")


def stats(values: list[int]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"min": int(a.min()), "median": round(float(np.median(a)), 1), "mean": round(float(a.mean()), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": int(a.max())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="image shard directory, glob or brace pattern (as --data in training)")
    p.add_argument("--image_size", type=int, default=DVAEConfig.image_size,
                   help=f"training image size S (default: {DVAEConfig.image_size})")
    p.add_argument("--min_image_size", type=int, default=MIN_IMAGE_SIZE,
                   help=f"short sides below this are skipped (default: {MIN_IMAGE_SIZE})")
    p.add_argument("--max_pixels", type=int, default=MAX_PIXELS, help=f"(default: {MAX_PIXELS})")
    p.add_argument("--grid_size", type=int, default=None, help="token shards: expected code grid side (default: meta.json)")
    p.add_argument("--num_tokens", type=int, default=None, help="token shards: codebook size (default: meta.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory): count captions over --text_len")
    p.add_argument("--text_len", type=int, default=DalleConfig.text_len, help=f"(default: {DalleConfig.text_len})")
    p.add_argument("--max_skip_fraction", type=float, default=TrainConfig.max_skip_fraction,
                   help=f"exit 1 above this skipped fraction (default: {TrainConfig.max_skip_fraction}, as in training)")
    p.add_argument("--json", default=None, help="write the full report (every problem, per-shard details) here")
    p.add_argument("--show", type=int, default=50, help="problem lines to print (default: 50)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes reading shards (default: min(8, CPU count))")
    args = p.parse_args(argv)

    tokenizer = args.tokenizer
    if tokenizer and os.path.isdir(tokenizer):
        tokenizer = os.path.join(tokenizer, "tokenizer.json")
    if tokenizer and not os.path.exists(tokenizer):
        raise FileNotFoundError(f"{tokenizer}: tokenizer not found; pass the tokenizer.json from train/train_tokenizer.py")
    urls = shard_urls(args.data)
    tokens, grid, num_tokens = token_layout(args.data, urls, args.grid_size, args.num_tokens)
    if tokens:
        check = partial(validate_token_shard, grid=grid, num_tokens=num_tokens, tokenizer=tokenizer, text_len=args.text_len)
    else:
        check = partial(validate_shard, image_size=args.image_size, min_image_size=args.min_image_size,
                        max_pixels=args.max_pixels, tokenizer=tokenizer, text_len=args.text_len)
    workers = max(1, min(args.num_workers, len(urls)))
    reports = []
    with tqdm(total=len(urls), desc="validate", unit="shard") as bar:
        if workers == 1:
            results = map(check, urls)
        else:
            pool = get_context("spawn").Pool(workers)  # spawn: no forked copies of the caller's threads
            results = pool.imap(check, urls)
        for report in results:
            reports.append(report)
            bar.update(1)
            bar.set_postfix(ok=sum(r["ok"] for r in reports), skipped=sum(sum(r["skipped"].values()) for r in reports))
        if workers > 1:
            pool.close()

    skipped, notes, modes, formats, grids = Counter(), Counter(), Counter(), Counter(), Counter()
    for r in reports:
        skipped.update(r["skipped"])
        notes.update(r["notes"])
        modes.update(r.get("modes", {}))
        formats.update(r.get("formats", {}))
        grids.update(r.get("grids", {}))
    problems = [p for r in reports for p in r["problems"]]
    seen, ok, total = sum(r["seen"] for r in reports), sum(r["ok"] for r in reports), sum(skipped.values())
    every = lambda key: [v for r in reports for v in r[key]]  # noqa: E731
    summary = {
        "data": args.data, "kind": "tokens" if tokens else "images", "shards": len(urls), "seen": seen, "ok": ok,
        "skipped": total, "skipped_fraction": total / max(seen, 1), "skip_reasons": dict(skipped.most_common()),
        "notes": dict(notes), "caption_chars": stats(every("caption_chars")),
        "caption_tokens": stats(every("caption_tokens")), "text_len": args.text_len if tokenizer else None,
    }
    if tokens:
        used = set(every("codes_used"))
        summary.update(grid_size=grid, num_tokens=num_tokens, grids=dict(grids.most_common()), codes_used=len(used),
                       code_range=[min(used), max(used)] if used else None)
    else:
        summary.update(modes=dict(modes.most_common()), formats=dict(formats.most_common()),
                       wrong_extension=sum(r["wrong_extension"] for r in reports),
                       icc_profiles=sum(r["icc_profiles"] for r in reports),
                       upscaled=sum(r["upscaled"] for r in reports), width=stats(every("widths")),
                       height=stats(every("heights")), image_size=args.image_size)
    bad_shards = sorted({p[1] for p in problems if p[0] in SHARD_REASONS})
    mixed = tokens and len(grids) > 1  # without a grid to check against, several grids cannot batch together
    failed = bool(bad_shards) or summary["skipped_fraction"] > args.max_skip_fraction or mixed

    for reason, shard, key, detail in problems[: args.show]:
        print(f"{shard} {key}: {reason}" + (f" ({detail})" if detail else ""))
    if len(problems) > args.show:
        print(f"... {len(problems) - args.show} more problems" + (f" in {args.json}" if args.json else " (--json FILE lists all)"))
    print(f"\n{len(urls)} shards, {seen} samples read: {ok} usable, {total} skipped "
          f"({100 * summary['skipped_fraction']:.2f}%)")
    for reason, n in skipped.most_common():
        print(f"  {reason:<18} {n:>8}  {SKIP_REASONS[reason]}")
    for name, n in notes.items():
        print(f"  {name:<18} {n:>8}  {NOTES[name]} (text_len {args.text_len})")
    if tokens:
        print(f"code grids: {summary['grids']}" + (f" (expected {grid}x{grid})" if grid else " (no grid to check: "
              "pass --grid_size or keep encode.py's meta.json)"))
        print(f"codes used: {summary['codes_used']}" + (f" of {num_tokens}" if num_tokens else "")
              + (f", range {summary['code_range']}" if summary["code_range"] else ""))
    else:
        converted = {m: n for m, n in modes.items() if m != "RGB"}
        print(f"image modes: {dict(modes.most_common())}" + (f" ({sum(converted.values())} converted to RGB)" if converted else ""))
        print(f"formats: {dict(formats.most_common())}; wrong extension: {summary['wrong_extension']}; "
              f"upscaled (short side < {args.image_size}): {summary['upscaled']}; ICC-tagged (converted to sRGB "
              f"unless sRGB): {summary['icc_profiles']}")
    for key in ("width", "height", "caption_chars", "caption_tokens"):
        if summary.get(key):
            print(f"{key}: {summary[key]}")
    if args.json:
        per_shard = [{k: v for k, v in r.items()
                      if k not in ("widths", "heights", "caption_chars", "caption_tokens", "codes_used")} for r in reports]
        save_json(args.json, {"summary": summary, "shards": per_shard})
        print(f"report -> {args.json}")
    if failed:
        why = ([f"{len(bad_shards)} shard(s) unreadable, truncated or empty"] if bad_shards else []) + \
              ([f"{100 * summary['skipped_fraction']:.2f}% skipped > --max_skip_fraction {args.max_skip_fraction}"]
               if summary["skipped_fraction"] > args.max_skip_fraction else []) + \
              ([f"several code grids {sorted(grids)}: pass --grid_size to see which samples"] if mixed else [])
        print(f"FAILED: {'; '.join(why)}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
