"""Reading shards: shard URLs, our own tar reader (so shard damage is counted by kind), and the webdataset
datasets and loaders around it.

Data flow: `shard_urls` -> (split over ranks and workers, or resampled) -> `shard_samples` (raw samples
{"__key__", "__url__", ext: bytes}) -> a decode stage (`decode.py`, skips counted) -> (codes or image,
caption, key). `raw_dataset` is the shared front half; `image_text_dataset`, `token_dataset` and
`embeddings.embedding_dataset` each compose their own decode stage on it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tarfile
from collections import Counter
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes

from dalle_ar.config import ConfigError, DataError
from dalle_ar.data.decode import (IMAGE_MEMBERS, MAX_PIXELS, MIN_IMAGE_SIZE, SHARD_REASONS, SkipCounter, SkipSample,
                                  decode_caption, decode_sample, decode_token_sample, image_to_uint8)


_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")  # a URL scheme, as webdataset's gopen reads it (not a path)


def _check_scheme(url: str) -> None:
    """A remote URL must name a scheme webdataset's gopen can open; s3 has none there: say how to stream it."""
    scheme = _SCHEME.match(url).group(1)
    if scheme not in gopen_schemes:
        recipe = {"s3": f"pipe:aws s3 cp {url} -"}.get(scheme, f"pipe:<a command that writes {url} to stdout>")
        raise ConfigError(f"{url}: webdataset cannot open {scheme}: URLs; stream them through a pipe, e.g. --data "
                          f"'{recipe}' (brace patterns work inside the pipe command too)")


def shard_urls(spec: str) -> list[str]:
    """A directory of .tar files, a glob, a brace pattern (`shards/{0000..0099}.tar`), a list with '::', or
    URLs that webdataset's gopen opens (`pipe:CMD`, http(s), gs, hf, ais, ...; `pipe:aws s3 cp s3://b/x.tar -` for
    s3). URLs are passed as they are: whether they open shows when they are read (an unreadable shard is counted)."""
    if "::" in spec:
        return [u for part in spec.split("::") for u in shard_urls(part)]
    if "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif _SCHEME.match(spec):
        urls = [spec]
    elif os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = sorted(glob.glob(spec))
    for url in urls:
        if _SCHEME.match(url):
            _check_scheme(url)
    urls = [u for u in urls if _SCHEME.match(u) or os.path.exists(u)]
    if not urls:
        raise FileNotFoundError(f"{spec}: no .tar shards found; create them with `python train/make_shards.py "
                                f"synthetic --out {spec}` (or `folder --src <images>`), or pass --data <dir|glob>")
    return urls


# ----------------------------------------------------------------------------------------------
# Our own tar reader (so shard damage is counted by kind)
# ----------------------------------------------------------------------------------------------

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's rule: key = path up to the first dot of the name


def _member_key(name: str) -> tuple[str, str]:
    m = _MEMBER.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


def shard_samples(url: str, skips: SkipCounter, select: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The samples of one tar shard in order, as {"__key__", "__url__", ext: bytes}; `select(ext)` picks
    members to read. An unreadable, empty or truncated shard is counted; a truncated one still gives
    every sample before the damage (the sample being read when it broke off is lost with it)."""
    try:
        stream = wds.gopen(url)  # a path, or pipe:/http:/s3: like webdataset
    except Exception as e:
        skips.skip("unreadable_shard", url, detail=f"{type(e).__name__}: {e}")
        return
    try:
        yield from _tar_samples(stream, url, skips, select)
    except BaseException:  # an error, a stop signal or an abandoned generator: close, but let that one through
        with contextlib.suppress(Exception):
            stream.close()  # (a pipe's command may fail on the early close: not news)
        raise
    stream.close()


def _tar_samples(stream, url: str, skips: SkipCounter, select) -> Iterator[dict]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # streaming: works on pipes, detects .tar.gz
    except tarfile.ReadError as e:
        skips.skip("empty_shard" if "empty file" in str(e) else "unreadable_shard", url, detail=str(e))
        return
    members, current = 0, None
    try:
        for info in tar:
            if not info.isreg():
                continue
            members += 1
            key, ext = _member_key(info.name)
            if key.rsplit("/", 1)[-1].startswith("__") or (select and not select(ext)):
                continue
            if current is not None and key != current["__key__"]:
                yield current  # complete: the next key has begun
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = tar.extractfile(info).read()
            tar.members = []  # streaming mode would otherwise keep every header
    except Exception as e:  # tarfile.ReadError, EOFError, zlib.error, OSError
        skips.skip("truncated_shard" if members else "unreadable_shard", url,
                   current["__key__"] if current else "", f"{type(e).__name__}: {e}")
        return
    if current is not None:
        yield current
    if not members:
        skips.skip("empty_shard", url)


# What a resampled stream keeps of the shards it has read whole, per reader (each rank's DataLoader workers keep their
# own): their samples' bytes, up to this many. A small dataset trained for many epochs then parses each tar once (the
# demo's dVAE reads its 8,000 images ten times, and tarfile's header parsing was half the reader's time).
SHARD_CACHE_BYTES = 256 * 2 ** 20


def _read_shards(src: Iterator[dict], skips: SkipCounter, select=None, give_up: int = 0,
                 cache_bytes: int = 0) -> Iterator[dict]:
    """Pipeline stage: {"url"} -> samples. With resampled shards the stream never ends, so `give_up`
    consecutive shards without a sample (all empty or unreadable) stop it with a DataError. With `cache_bytes`, the
    samples of each shard read without damage are kept (while they fit) and given again when the shard comes again:
    the same samples in the same order, without reading the tar."""
    barren, cache, held = 0, {}, 0
    for shard in src:
        url = shard["url"]
        if url in cache:
            yield from cache[url]
            barren = 0
            continue
        got, damage = False, _shard_damage(skips)
        kept, size = ([] if held < cache_bytes else None), 0
        for sample in shard_samples(url, skips, select):
            got = True
            if kept is not None:  # let go as soon as the shard cannot fit: a big shard is never held whole
                size += sum(len(v) for k, v in sample.items() if not k.startswith("__"))
                if held + size <= cache_bytes:
                    kept.append(sample)
                else:
                    kept = None
            yield sample
        if kept and _shard_damage(skips) == damage:
            cache[url], held = kept, held + size
        barren = 0 if got else barren + 1
        if give_up and barren >= give_up:
            raise DataError(f"{barren} shards in a row gave no sample ({skips.summary()}); run "
                            f"`python train/validate_shards.py {skips.source or 'DATA'}` to see what is wrong")


def _shard_damage(skips: SkipCounter) -> tuple[int, ...]:
    counts = skips.counts
    return tuple(counts.get(reason, 0) for reason in SHARD_REASONS)


# ----------------------------------------------------------------------------------------------
# Datasets: webdataset around the reader, a decode stage on top
# ----------------------------------------------------------------------------------------------

# No batch can form while every sample is skipped: after this many skips in a row (per reader) the stream stops with
# an error that names the reasons, instead of spinning forever (e.g. image shards given to the token trainer).
MAX_SKIPS_IN_A_ROW = 1000


def decoded(src: Iterator[dict], skips: SkipCounter, decode: Callable[[dict], tuple], max_in_a_row: int):
    """Pipeline stage: raw samples -> decode(sample), skipping (and counting) the samples it refuses; stops with a
    DataError after `max_in_a_row` consecutive skips (0 = never)."""
    in_a_row, reasons, last = 0, Counter(), None
    for sample in src:
        skips.saw()
        try:
            out = decode(sample)
        except SkipSample as s:
            skips.skip(s.reason, sample["__url__"], sample["__key__"], s.detail)
            reason = s.reason
        except Exception as e:
            skips.skip("other", sample["__url__"], sample["__key__"], f"{type(e).__name__}: {e}")
            reason = "other"
        else:
            in_a_row = 0
            reasons.clear()
            yield out
            continue
        in_a_row, last = in_a_row + 1, sample
        reasons[reason] += 1
        if max_in_a_row and in_a_row >= max_in_a_row:
            raise DataError(f"{in_a_row} samples in a row skipped, none usable ({', '.join(f'{k} {v}' for k, v in reasons.most_common())}; "
                            f"last: {last['__url__']} {last['__key__']}); {_fix(reasons, last, skips.source)}")


def _fix(reasons: Counter, sample: dict, source: str) -> str:
    """The likely fix for a stream in which nothing decodes."""
    members = set(sample) - {"__key__", "__url__"}
    if reasons.most_common(1)[0][0] == "missing_codes" and members & set(IMAGE_MEMBERS):
        return (f"these are image shards, not token shards: encode them first with `python train/encode.py --dvae "
                f"<dvae export> --data {source or 'IMAGES'} --out <tokens>` and pass --data <tokens>")
    if reasons.most_common(1)[0][0] in ("missing_image", "missing_caption") and members & {"codes.npy"}:
        return "these are token shards (train/encode.py output): train the transformer on them, or pass image shards"
    return f"run `python train/validate_shards.py {source or 'DATA'}` to see what is wrong with them"


def _image_text(sample: dict, image_size: int, uint8: bool, min_image_size: int, max_pixels: int):
    image, _, text = decode_sample(sample, image_size, min_image_size, max_pixels)
    pixels = image_to_uint8(image, image_size)
    return (pixels if uint8 else pixels.float().div_(255)), text, sample["__key__"]


def _token_text(sample: dict, grid: int | None = None, num_tokens: int | None = None):
    codes, text = decode_token_sample(sample, grid, num_tokens)
    return torch.from_numpy(codes.astype(np.int64)), text, sample["__key__"]


class FluidPipeline(wds.DataPipeline, wds.FluidInterface):
    """A webdataset DataPipeline with WebDataset's fluid methods (.batched, .shuffle, .map, ...)."""


def raw_dataset(spec: str | list[str], resampled: bool, shuffle: int, seed: int, skips: SkipCounter,
                split: bool = True, select=None) -> FluidPipeline:
    """Shard list -> (split over ranks and workers) -> raw samples -> (sample shuffle buffer)."""
    urls = spec if isinstance(spec, list) else shard_urls(spec)
    skips.source = skips.source or (spec if isinstance(spec, str) else " ".join(spec))
    if resampled:
        # WebDataset(resampled=True) seeds its shard sampler with the pid and the clock, so no two runs read
        # the same stream. This sampler is seeded by (seed, rank, worker, epoch): distinct per rank and
        # DataLoader worker, identical across runs, so a resumed run can fast-forward to its data position.
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls)]
        if split:
            stages += [wds.split_by_node, wds.split_by_worker]
        if shuffle:
            stages.append(wds.shuffle(len(urls), seed=seed))
    stages.append(partial(_read_shards, skips=skips, select=select, give_up=10 * len(urls) if resampled else 0,
                          cache_bytes=SHARD_CACHE_BYTES if resampled else 0))
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    return FluidPipeline(*stages)


def image_text_dataset(spec: str | list[str], image_size: int, *, resampled: bool = False, shuffle: int = 0,
                       seed: int = 0, skips: SkipCounter | None = None, uint8: bool = False,
                       split: bool = True, min_image_size: int = MIN_IMAGE_SIZE,
                       max_pixels: int = MAX_PIXELS, max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW) -> FluidPipeline:
    """Yields (image (3,S,S) float [0,1], caption str, key); with uint8=True the image stays uint8 (4x less
    to move between processes and to the GPU). split=False reads every shard here, with no split over
    ranks and DataLoader workers (for a caller that splits shards itself). Bad samples and shards are
    skipped and counted in `skips` by reason (SKIP_REASONS); `open_image` and `to_rgb` say what is kept."""
    skips = skips if skips is not None else SkipCounter()
    decode = partial(_image_text, image_size=image_size, uint8=uint8, min_image_size=min_image_size,
                     max_pixels=max_pixels)
    return raw_dataset(spec, resampled, shuffle, seed, skips, split).compose(
        partial(decoded, skips=skips, decode=decode, max_in_a_row=max_skips_in_a_row))


class ShardBatches(torch.utils.data.IterableDataset):
    """One pass over image shards in per-shard batches, for pre-encoding. Each DataLoader worker reads
    whole shards (worker i of n takes shards i, i+n, ...); a batch never spans two shards. Yields

      ("batch", url, images (B,3,S,S) uint8, captions, keys)   for each batch of a shard, then
      ("done", url, num_samples, skip counts)                   once the shard is read,

    so the consumer can finish that shard's output (the per-shard counts go into its record).
    Use DataLoader(batch_size=None)."""

    def __init__(self, urls: list[str], image_size: int, batch_size: int):
        super().__init__()
        self.urls, self.image_size, self.batch_size = list(urls), image_size, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        skips = SkipCounter()  # one per worker: warns once per kind, per-shard counts are differences
        for url in mine:
            before, n = dict(skips.counts), 0
            ds = image_text_dataset([url], self.image_size, skips=skips, uint8=True, split=False)
            for images, captions, keys in ds.batched(self.batch_size, partial=True):
                n += len(keys)
                yield "batch", url, images, captions, keys
            yield "done", url, n, {k: v - before.get(k, 0) for k, v in skips.counts.items() if v > before.get(k, 0)}


def token_dataset(spec: str, *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                  skips: SkipCounter | None = None, grid: int | None = None, num_tokens: int | None = None,
                  max_skips_in_a_row: int = MAX_SKIPS_IN_A_ROW) -> FluidPipeline:
    """Yields (codes (h, w) long, caption str, key); bad samples and shards are counted in `skips`, and so
    are codes not grid x grid or outside [0, num_tokens) when those are given (`decode_token_sample`)."""
    skips = skips if skips is not None else SkipCounter()
    return raw_dataset(spec, resampled, shuffle, seed, skips).compose(
        partial(decoded, skips=skips, decode=partial(_token_text, grid=grid, num_tokens=num_tokens),
                max_in_a_row=max_skips_in_a_row))


def captions(spec: str, skips: SkipCounter | None = None) -> Iterator[str]:
    """Every usable caption in the shards, in order; only the .txt members are read (no image decode).
    Empty and non-UTF-8 captions are skipped and counted as in training."""
    skips = skips if skips is not None else SkipCounter(source=spec)
    for url in shard_urls(spec):
        for sample in shard_samples(url, skips, select=lambda ext: ext == "txt"):
            skips.saw()
            try:
                yield decode_caption(sample["txt"])
            except SkipSample as s:
                skips.skip(s.reason, url, sample["__key__"], s.detail)


def batches(dataset, batch_size: int, num_workers: int = 0, partial: bool = True) -> wds.WebLoader:
    """Batch in the dataset (cheap collation in workers), loader passes batches through."""
    return wds.WebLoader(dataset.batched(batch_size, partial=partial), batch_size=None, num_workers=num_workers,
                         persistent_workers=num_workers > 0)


def infinite(loader) -> Iterator:
    """Cycle a finite loader forever (training is counted in steps, not epochs)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the data loader yielded no batch: are all shards empty or unreadable? "
                            "run `python train/validate_shards.py DATA` to see")
