"""Writing shards: image shards (from examples or an image folder), token shards, and `TokenShards`, the
resumable per-shard output of encoding.

Image shards hold `KEY.png|jpg` + `KEY.txt` (what img2dataset writes, too). Token shards, written by
`train/encode.py`, hold `KEY.codes.npy` (the dVAE grid, uint16) + `KEY.txt` (the caption, so a new
tokenizer never needs a re-encode). Encoding maps each image shard to a token shard of the same name
(`read.ShardBatches` reads, `TokenShards` writes and records what is done, so a rerun resumes).
"""

from __future__ import annotations

import codecs
import io
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dalle_ar.config import ConfigError, load_json, save_json
from dalle_ar.data.decode import IMAGE_EXTS, SkipSample, decode_caption
from dalle_ar.data.read import ShardBatches


class _Writer:
    """ShardWriter that names shards 000000.tar, 000001.tar, ... in `out_dir`, atomically: the shards are written
    into `<out_dir>.partial/` and moved into `out_dir` only when the writer closes without an error, so a crash never
    leaves a smaller dataset that looks complete. A `.partial` directory left by an interrupted run is removed (the
    import starts over); an `out_dir` that already holds shards is refused rather than mixed."""

    def __init__(self, out_dir: str | Path, samples_per_shard: int):
        self.out = Path(out_dir)
        self.staging = self.out.with_name(self.out.name + ".partial")
        if self.out.is_dir() and any(self.out.glob("*.tar")):
            raise ConfigError(f"{self.out}: already holds shards; pass another --out or delete it first")
        if self.staging.exists():
            print(f"{self.staging}: removing the partial output of an interrupted run; starting over", flush=True)
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        self.sink = wds.ShardWriter(str(self.staging / "%06d.tar"), maxcount=samples_per_shard, verbose=0)

    def __enter__(self):
        return self.sink

    def __exit__(self, exc_type, *exc):
        self.sink.close()
        if exc_type is not None:  # keep the clearly marked partial output; the next run removes it
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for shard in sorted(self.staging.iterdir()):
            os.replace(shard, self.out / shard.name)
        self.staging.rmdir()


def encode_image(image: Image.Image, fmt: str) -> bytes:
    """A shard member's bytes: "jpg" (RGB, quality 95) or PNG (lossless, any mode)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def write_image_shards(examples: Iterable[tuple[str, Image.Image | bytes, str]], out_dir: str | Path,
                       samples_per_shard: int = 1000, image_format: str = "png") -> int:
    """Write (key, image, caption) triples, the image a PIL image or its bytes already encoded as `image_format`;
    returns the number written."""
    n = 0
    with _Writer(out_dir, samples_per_shard) as sink:
        for key, image, caption in examples:
            data = image if isinstance(image, bytes) else encode_image(image, image_format)
            sink.write({"__key__": key, image_format: data, "txt": caption})
            n += 1
    return n


def read_caption(path: Path, fallback: str | None = None) -> tuple[str, str | None]:
    """A sidecar caption file -> (text, conversion or None). UTF-8 (a BOM is dropped) as the loaders read it; bytes
    that are not UTF-8 are decoded with the declared `fallback` encoding (e.g. cp1252) and reported as a conversion,
    or, without one, raise `SkipSample("non_utf8_caption")`. Empty captions raise `SkipSample("empty_caption")`."""
    data = path.read_bytes()
    try:
        return decode_caption(data), None
    except SkipSample as e:
        if e.reason != "non_utf8_caption" or not fallback:
            raise
    try:
        text = data.decode(fallback).strip()
    except UnicodeDecodeError as e:  # cp1252 leaves five bytes undefined
        raise SkipSample("non_utf8_caption", f"not {fallback} either: byte 0x{data[e.start]:02x} at {e.start}") from None
    if not text:
        raise SkipSample("empty_caption")
    return text, f"{fallback}_caption"


def import_folder(src: str | Path, out_dir: str | Path, samples_per_shard: int = 1000,
                  caption_fallback: str | None = None) -> dict:
    """Pack `src/**/NAME.{jpg,png,...}` with sidecar `NAME.txt` captions into shards.

    Bytes are copied as they are (no re-encode); captions are written as UTF-8 (see `read_caption` for other
    encodings). Images without a usable caption are skipped and counted by reason; the shards appear in `out_dir`
    only when the whole folder is done (`_Writer`). Returns {"written", "skipped": {reason: n}, "converted": {...}}."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory; pass --src <folder with image files and .txt captions>")
    if caption_fallback:
        try:
            codecs.lookup(caption_fallback)
        except LookupError:
            raise ConfigError(f"--caption_fallback {caption_fallback}: unknown encoding; use e.g. cp1252 or latin-1") from None
    images = sorted(p for p in src.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    written, skipped, converted = 0, Counter(), Counter()
    with _Writer(out_dir, samples_per_shard) as sink:
        for i, path in enumerate(images):
            cap = path.with_suffix(".txt")
            if not cap.exists():
                skipped["missing_caption"] += 1
                continue
            try:
                text, conversion = read_caption(cap, caption_fallback)
            except SkipSample as e:
                skipped[e.reason] += 1
                print(f"{cap}: skipped ({e.reason}{': ' + e.detail if e.detail else ''})", flush=True)
                continue
            if conversion:
                converted[conversion] += 1
            ext = "jpg" if path.suffix.lower() in (".jpg", ".jpeg") else path.suffix.lower().lstrip(".")
            sink.write({"__key__": f"{i:09d}", ext: path.read_bytes(), "txt": text})
            written += 1
        if written == 0:
            raise FileNotFoundError(f"{src}: no image with a usable sidecar .txt caption found (expected NAME.jpg + "
                                    f"NAME.txt; skipped: {dict(skipped) or 'none'})")
    return {"written": written, "skipped": dict(skipped), "converted": dict(converted)}


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


# ----------------------------------------------------------------------------------------------
# Encoding's output: one token shard per image shard, recorded when done, so a rerun resumes
# ----------------------------------------------------------------------------------------------

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

    def process(self, image_size: int, batch_size: int, num_workers: int, device: torch.device,
                fn: Callable[[str, torch.Tensor, list[str], list[str]], None], desc: str, done_word: str) -> dict:
        """Read the pending image shards in per-shard batches (`ShardBatches`, whole shards per DataLoader
        worker) and call `fn(url, images uint8 (B,3,S,S), captions, keys)` for each batch, which computes
        and `write`s that batch; each shard is finished once read. Progress bar over images and shards.
        Returns `summary()`."""
        from tqdm import tqdm

        pending = self.pending
        if len(pending) < len(self.names):
            print(f"{len(self.names) - len(pending)} of {len(self.names)} shards already {done_word} in {self.out}: "
                  f"skipping them")
        loader = torch.utils.data.DataLoader(
            ShardBatches(pending, image_size, batch_size), batch_size=None,
            num_workers=min(num_workers, len(pending)), pin_memory=device.type == "cuda",
            in_order=False)  # a slow shard does not stall the others; order within a shard is kept
        with tqdm(desc=desc, unit="img", mininterval=1.0) as bar, torch.inference_mode():
            finished = 0
            bar.set_postfix(shards=f"0/{len(pending)}")
            for kind, url, *item in loader:
                if kind == "batch":
                    images, captions, keys = item
                    fn(url, images, list(captions), keys)
                    bar.update(len(keys))
                else:
                    self.finish(url, *item)
                    finished += 1
                    bar.set_postfix(shards=f"{finished}/{len(pending)}")
        return self.summary()

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


def encoded_with_sha256(tokens_dir: str | Path) -> str | None:
    """sha256 of the dVAE weights that made `tokens_dir`'s shards: its meta.json's, or, in a meta.json written
    before it recorded one, the shards' progress records' when they all name the same weights (else None)."""
    tokens_dir = Path(tokens_dir)
    recorded = load_json(tokens_dir / "meta.json").get("dvae_sha256")
    if recorded:
        return recorded
    records = {load_json(path).get("dvae_sha256") for path in (tokens_dir / "progress").glob("*.json")}
    return records.pop() if len(records) == 1 else None
