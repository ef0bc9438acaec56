"""webdataset shards: write, read, import a folder, and token shards.

Image shards hold `KEY.png|jpg` + `KEY.txt` (what img2dataset writes, too). Token shards, written by
`train/encode.py`, hold `KEY.codes.npy` (the dVAE grid, uint16) + `KEY.txt` (the caption, so a new
tokenizer never needs a re-encode).
"""

from __future__ import annotations

import glob
import io
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_urls(spec: str) -> list[str]:
    """A directory of .tar files, a glob, a brace pattern (`shards/{0000..0099}.tar`) or a list with '::'."""
    if "::" in spec:
        return [u for part in spec.split("::") for u in shard_urls(part)]
    if "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
    else:
        urls = sorted(glob.glob(spec))
    urls = [u for u in urls if u.startswith(("pipe:", "http:", "https:", "s3:")) or os.path.exists(u)]
    if not urls:
        raise FileNotFoundError(f"{spec}: no .tar shards found; create them with `python train/make_shards.py "
                                f"synthetic --out {spec}` (or `folder --src <images>`), or pass --data <dir|glob>")
    return urls


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

class _Writer:
    """ShardWriter that names shards 000000.tar, 000001.tar, ... in `out_dir`."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.sink = wds.ShardWriter(str(Path(out_dir) / "%06d.tar"), maxcount=samples_per_shard, verbose=0)

    def __enter__(self):
        return self.sink

    def __exit__(self, *exc):
        self.sink.close()


def _encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def write_image_shards(examples: Iterable[tuple[str, Image.Image, str]], out_dir: str | Path,
                       samples_per_shard: int = 1000, image_format: str = "png") -> int:
    """Write (key, image, caption) triples; returns the number written."""
    n = 0
    with _Writer(out_dir, samples_per_shard) as sink:
        for key, image, caption in examples:
            sink.write({"__key__": key, image_format: _encode_image(image, image_format), "txt": caption})
            n += 1
    return n


def import_folder(src: str | Path, out_dir: str | Path, samples_per_shard: int = 1000) -> dict:
    """Pack `src/**/NAME.{jpg,png,...}` with sidecar `NAME.txt` captions into shards.

    Images without a caption file are skipped and counted; bytes are copied as they are (no re-encode)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory; pass --src <folder with image files and .txt captions>")
    images = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    stats = {"written": 0, "skipped_no_caption": 0}
    with _Writer(out_dir, samples_per_shard) as sink:
        for i, path in enumerate(images):
            cap = path.with_suffix(".txt")
            if not cap.exists():
                stats["skipped_no_caption"] += 1
                continue
            ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
            sink.write({"__key__": f"{i:09d}", ext: path.read_bytes(), "txt": cap.read_text().strip()})
            stats["written"] += 1
    if stats["written"] == 0:
        raise FileNotFoundError(f"{src}: no image with a sidecar .txt caption found (expected NAME.jpg + NAME.txt)")
    return stats


def write_token_shards(examples: Iterable[tuple[str, np.ndarray, str]], out_dir: str | Path,
                       samples_per_shard: int = 5000) -> int:
    n = 0
    with _Writer(out_dir, samples_per_shard) as sink:
        for key, codes, caption in examples:
            sink.write({"__key__": key, "codes.npy": np.asarray(codes, dtype=np.uint16), "txt": caption})
            n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

class SkipCounter:
    """webdataset handler: skip a bad sample or shard, count it, warn once per kind."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, exn: Exception) -> bool:
        kind = type(exn).__name__
        if kind not in self.counts:
            log.warning("skipping bad data (%s: %s); further ones are counted", kind, exn)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return True

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL (any mode) -> (3, S, S) float in [0, 1]: RGB, resize the short side, center crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = image_size / min(w, h)
    if (w, h) != (image_size, image_size):
        image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)


def _dataset(spec: str, resampled: bool, shuffle: int, seed: int, handler) -> wds.WebDataset:
    urls = shard_urls(spec)
    ds = wds.WebDataset(urls, resampled=resampled, shardshuffle=(len(urls) if shuffle and not resampled else False),
                        nodesplitter=wds.split_by_node, handler=handler,
                        empty_check=False, seed=seed)
    return ds.shuffle(shuffle, seed=seed) if shuffle else ds


def image_text_dataset(spec: str, image_size: int, *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                       skips: SkipCounter | None = None) -> wds.WebDataset:
    """Yields (image (3,S,S) float [0,1], caption str, key)."""
    handler = skips or SkipCounter()
    return (_dataset(spec, resampled, shuffle, seed, handler)
            .decode("pil", handler=handler)
            .to_tuple("jpg;jpeg;png;webp", "txt", "__key__", handler=handler)
            .map_tuple(lambda im: image_to_tensor(im, image_size), str.strip, lambda k: k, handler=handler))


def token_dataset(spec: str, *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                  skips: SkipCounter | None = None) -> wds.WebDataset:
    """Yields (codes (h, w) long, caption str, key)."""
    handler = skips or SkipCounter()
    return (_dataset(spec, resampled, shuffle, seed, handler)
            .decode(handler=handler)
            .to_tuple("codes.npy", "txt", "__key__", handler=handler)
            .map_tuple(lambda c: torch.from_numpy(c.astype(np.int64)), str.strip, lambda k: k, handler=handler))


def captions(spec: str, skips: SkipCounter | None = None) -> Iterator[str]:
    """Every non-empty caption in the shards, in order; only the .txt members are read (no image decode)."""
    ds = wds.WebDataset(shard_urls(spec), shardshuffle=False, handler=skips or SkipCounter(), empty_check=False,
                        nodesplitter=None, select_files=lambda name: name.endswith(".txt"))
    for sample in ds:
        text = sample.get("txt")
        if text:
            yield text.decode("utf-8", errors="replace").strip()


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
            raise RuntimeError("the data loader yielded no batch: are all shards empty or unreadable?")
