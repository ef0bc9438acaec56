"""webdataset shards: write, read, import a folder, and token shards.

Image shards hold `KEY.png|jpg` + `KEY.txt` (what img2dataset writes, too). Token shards, written by
`train/encode.py`, hold `KEY.codes.npy` (the dVAE grid, uint16) + `KEY.txt` (the caption, so a new
tokenizer never needs a re-encode). Encoding maps each image shard to a token shard of the same name
(`ShardBatches` reads, `TokenShards` writes and records what is done, so a rerun resumes).
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dalle_ar.config import ConfigError, load_json, save_json

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


def token_sample(key: str, codes: np.ndarray, caption: str) -> dict:
    """One token-shard sample; uint16 holds codebooks up to 65536 codes (paper: 8192)."""
    return {"__key__": key, "codes.npy": np.asarray(codes, dtype=np.uint16), "txt": caption}


def write_token_shards(examples: Iterable[tuple[str, np.ndarray, str]], out_dir: str | Path,
                       samples_per_shard: int = 5000) -> int:
    n = 0
    with _Writer(out_dir, samples_per_shard) as sink:
        for key, codes, caption in examples:
            sink.write(token_sample(key, codes, caption))
            n += 1
    return n


def token_shard_name(url: str) -> str:
    """Output name for an input shard: `data/x/000003.tar` -> `000003.tar` (`.tar.gz` -> `.tar`)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    return name.split(".tar")[0] + ".tar"


class TokenShards:
    """The output side of encoding: `out/NAME.tar` for each input shard `.../NAME.tar`, and a record
    `out/progress/NAME.json` (samples, skip counts, the dVAE that made the codes) for each finished one.

    A shard is written to `NAME.tar.tmp` and renamed after its record is written, so a crash never
    leaves a partial `.tar`, and a shard is done only when both exist. One record per shard (not one
    growing file) keeps the cost of finishing a shard constant at tens of thousands of shards.
    Use as a context manager: leaving it closes unfinished shards and deletes their temp files."""

    def __init__(self, out_dir: str | Path, urls: list[str], dvae: str, fingerprint: str):
        self.out, self.dvae, self.fingerprint = Path(out_dir), dvae, fingerprint
        self.names = {url: token_shard_name(url) for url in urls}
        seen: dict[str, str] = {}
        for url, name in self.names.items():
            if name in seen:
                raise ConfigError(f"{url}: same file name as {seen[name]}, and each input shard becomes "
                                  f"{self.out}/<its name>; encode the two sets into separate --out directories")
            seen[name] = url
        (self.out / "progress").mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob("*.tar.tmp"):  # left by a killed run
            stale.unlink()
        self.done: dict[str, dict] = {}
        for path in sorted((self.out / "progress").glob("*.json")):
            record = load_json(path)
            if record["dvae_sha256"] != fingerprint:
                raise ConfigError(f"{path}: {self.out} holds shards encoded with another dVAE ({record['dvae']}); "
                                  f"pass a new --out, or delete {self.out} to re-encode everything")
            if (self.out / record["shard"]).exists():
                self.done[record["shard"]] = record
        inputs = set(self.names.values())
        for path in sorted(self.out.glob("*.tar")):
            if path.name not in self.done and path.name not in inputs:  # training would read it, meta miss it
                raise ConfigError(f"{path}: a token shard with no record in {self.out / 'progress'} and no input "
                                  f"shard of that name (an older encode?); delete it, or pass a new --out")
        self.pending = [url for url in urls if self.names[url] not in self.done]
        self._open: dict[str, tuple[wds.TarWriter, int]] = {}

    def _tmp(self, url: str) -> Path:
        return self.out / (self.names[url] + ".tmp")

    def write(self, url: str, keys: list[str], codes: np.ndarray, captions: list[str]) -> None:
        if url not in self._open:
            # mtime=0: the same input gives byte-identical shards, whatever the worker count or run
            self._open[url] = (wds.TarWriter(open(self._tmp(url), "wb"), mtime=0), 0)
        sink, n = self._open[url]
        for key, c, caption in zip(keys, codes, captions):
            sink.write(token_sample(key, c, caption))
        self._open[url] = (sink, n + len(keys))

    def finish(self, url: str, num_samples: int, skipped: dict[str, int]) -> dict:
        """The reader has sent every sample of `url`: close, record and publish its token shard."""
        if url not in self._open:  # every sample was skipped: still one (empty) output per input
            self.write(url, [], [], [])
        sink, n = self._open.pop(url)
        if n != num_samples:
            raise RuntimeError(f"{url}: the reader sent {num_samples} samples but {n} arrived")
        stream = sink.stream
        sink.close()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        name = self.names[url]
        record = {"shard": name, "source": url, "num_samples": n, "skipped": skipped,
                  "dvae": self.dvae, "dvae_sha256": self.fingerprint}
        save_json(self.out / "progress" / (name[:-len(".tar")] + ".json"), record)
        os.replace(self._tmp(url), self.out / name)
        self.done[name] = record
        return record

    def summary(self) -> dict:
        """Totals over every finished shard in the directory, from this run and earlier ones."""
        skipped = Counter()
        for record in self.done.values():
            skipped.update(record["skipped"])
        return {"num_samples": sum(r["num_samples"] for r in self.done.values()), "num_shards": len(self.done),
                "skipped": dict(sorted(skipped.items()))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for url, (sink, _) in self._open.items():
            sink.close()
            sink.stream.close()
            self._tmp(url).unlink(missing_ok=True)
        self._open.clear()


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


def image_to_uint8(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL (any mode) -> (3, S, S) uint8: RGB, resize the short side, center crop."""
    image = image.convert("RGB")
    w, h = image.size
    scale = image_size / min(w, h)
    if (w, h) != (image_size, image_size):
        image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    arr = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1)


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL (any mode) -> (3, S, S) float in [0, 1]: RGB, resize the short side, center crop."""
    return image_to_uint8(image, image_size).float().div_(255)


class _Pipeline(wds.DataPipeline, wds.FluidInterface):
    """A webdataset DataPipeline with WebDataset's fluid methods (.decode, .to_tuple, .batched, ...)."""


def _dataset(spec: str | list[str], resampled: bool, shuffle: int, seed: int, handler,
             split: bool = True) -> wds.WebDataset:
    urls = spec if isinstance(spec, list) else shard_urls(spec)
    if resampled:
        # WebDataset(resampled=True) seeds its shard sampler with the pid and the clock, so no two runs read
        # the same stream. This sampler is seeded by (seed, rank, worker, epoch): distinct per rank and
        # DataLoader worker, identical across runs, so a resumed run can fast-forward to its data position.
        ds = _Pipeline(wds.ResampledShards(urls, seed=seed, deterministic=True), wds.tarfile_to_samples(handler=handler))
        return ds.shuffle(shuffle, seed=seed) if shuffle else ds
    ds = wds.WebDataset(urls, shardshuffle=(len(urls) if shuffle else False),
                        nodesplitter=wds.split_by_node if split else None,
                        workersplitter=wds.split_by_worker if split else None, handler=handler,
                        empty_check=False, seed=seed)
    return ds.shuffle(shuffle, seed=seed) if shuffle else ds


def image_text_dataset(spec: str | list[str], image_size: int, *, resampled: bool = False, shuffle: int = 0,
                       seed: int = 0, skips: SkipCounter | None = None, uint8: bool = False,
                       split: bool = True) -> wds.WebDataset:
    """Yields (image (3,S,S) float [0,1], caption str, key); with uint8=True the image stays uint8 (4x less
    to move between processes and to the GPU). split=False reads every shard here, with no split over
    ranks and DataLoader workers (for a caller that splits shards itself)."""
    handler = skips or SkipCounter()
    to_tensor = image_to_uint8 if uint8 else image_to_tensor
    return (_dataset(spec, resampled, shuffle, seed, handler, split)
            .decode("pil", handler=handler)
            .to_tuple("jpg;jpeg;png;webp", "txt", "__key__", handler=handler)
            .map_tuple(lambda im: to_tensor(im, image_size), str.strip, lambda k: k, handler=handler))


class ShardBatches(torch.utils.data.IterableDataset):
    """One pass over image shards in per-shard batches, for pre-encoding. Each DataLoader worker reads
    whole shards (worker i of n takes shards i, i+n, ...); a batch never spans two shards. Yields

      ("batch", url, images (B,3,S,S) uint8, captions, keys)   for each batch of a shard, then
      ("done", url, num_samples, skip counts)                   once the shard is read,

    so the consumer can finish that shard's output. Skip counts travel in the "done" item because a
    SkipCounter in a worker process never reaches the main process. Use DataLoader(batch_size=None)."""

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
