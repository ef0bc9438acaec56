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
import re
import tarfile
import warnings
from collections import Counter
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageCms, ImageOps

from dalle_ar.config import ConfigError, DataError, load_json, save_json

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


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

# Why a sample (or a whole shard) is dropped: the keys of `SkipCounter.counts`. The README's
# "Data quality and validation" table mirrors this.
SKIP_REASONS = {
    "unreadable_shard": "the shard cannot be opened or is not a tar file",
    "empty_shard": "the shard holds no files",
    "truncated_shard": "the tar breaks off: the samples before the damage are used, the one being read is lost",
    "missing_image": "a sample with no image member (.jpg .jpeg .png .webp .bmp .gif .tif .tiff)",
    "missing_caption": "a sample with no .txt member",
    "missing_codes": "a token-shard sample with no .codes.npy member",
    "corrupt_image": "the image bytes do not decode (truncated JPEG, broken PNG, not an image at all)",
    "image_too_small": "short side below min_image_size (1x1 tracking pixels, icons)",
    "image_too_large": "more than max_pixels pixels to decode (decompression bombs)",
    "empty_caption": "the caption is empty or whitespace only",
    "non_utf8_caption": "the caption bytes are not UTF-8",
    "corrupt_codes": ".codes.npy is not a 2-d integer array, or (in training) not the model's grid and codebook",
    "other": "any other error while reading a sample (its type is in the warning)",
}
# Kept, but worth knowing about: `SkipCounter.notes`.
NOTES = {"long_caption": "kept; the tokenizer truncates it to text_len (counted where a tokenizer encodes it)"}
SHARD_REASONS = ("unreadable_shard", "empty_shard", "truncated_shard")

IMAGE_MEMBERS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff")
MIN_IMAGE_SIZE = 16        # px, short side: smaller images are skipped (below, image_too_small), larger upscaled
MAX_PIXELS = 2 ** 26       # pixels decoded at most per image (8192 x 8192): larger ones are skipped


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class SkipCounter:
    """Counts samples read and skipped, by reason (SKIP_REASONS), and notes (NOTES).

    The counts live in a shared-memory table with one row per process (the main process and up to
    MAX_WORKERS DataLoader workers, each writing only its own row), so skips inside worker processes
    are seen by the main process, where the progress bar and the threshold check run. Each process
    warns once per reason. Counts are per rank: a multi-rank total needs an all-reduce of `as_dict()`.

      counts   {reason: n} of skipped samples/shards (only reasons with n > 0)
      notes    {note: n}, e.g. long_caption
      seen     samples attempted, plus one per shard-level problem (unreadable, empty, truncated shard)
      total    skips, sum(counts.values())
      summary() one line for the progress bar / end of run;  check(max_fraction) raises DataError

    With record=True (validate_shards, single process) every problem is kept in `problems` as a
    (reason, shard, key, detail) tuple. Also usable as a webdataset `handler=` (counted as "other")."""

    MAX_WORKERS = 64
    NAMES = (*SKIP_REASONS, *NOTES, "seen")

    def __init__(self, record: bool = False, source: str = ""):
        self._table = torch.zeros(self.MAX_WORKERS + 1, len(self.NAMES), dtype=torch.int64).share_memory_()
        self._index = {name: i for i, name in enumerate(self.NAMES)}
        self._warned: set[str] = set()
        self._view = None
        self.problems: list[tuple[str, str, str, str]] | None = [] if record else None
        self.source = source  # the --data spec, for messages; set by the dataset functions

    def __getstate__(self):  # the numpy view is per process; the shared tensor travels (torch reductions)
        return {**self.__dict__, "_view": None}

    def _row(self) -> np.ndarray:
        if self._view is None:
            self._view = self._table.numpy()  # same memory, ~50x cheaper to increment than the tensor
        info = torch.utils.data.get_worker_info()
        return self._view[0 if info is None else 1 + info.id % self.MAX_WORKERS]

    def saw(self, n: int = 1) -> None:
        self._row()[self._index["seen"]] += n

    def skip(self, reason: str, shard: str = "", key: str = "", detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        row = self._row()
        row[self._index[reason]] += 1
        if reason in SHARD_REASONS:
            row[self._index["seen"]] += 1
        where = f"{shard} {key}".strip()
        if self.problems is not None:
            self.problems.append((reason, shard, key, str(detail)))
        elif reason not in self._warned:
            self._warned.add(reason)
            log.warning("skipping bad data: %s at %s%s; further ones are counted", reason, where,
                        f" ({detail})" if detail else "")

    def note(self, name: str, n: int = 1) -> None:
        self._row()[self._index[name]] += n

    def __call__(self, exn: Exception) -> bool:
        self.skip("other", detail=f"{type(exn).__name__}: {exn}")
        return True

    def _sums(self) -> dict[str, int]:
        return dict(zip(self.NAMES, self._table.sum(0).tolist()))

    @property
    def counts(self) -> dict[str, int]:
        return {k: v for k, v in self._sums().items() if k in SKIP_REASONS and v}

    @property
    def notes(self) -> dict[str, int]:
        return {k: v for k, v in self._sums().items() if k in NOTES and v}

    @property
    def seen(self) -> int:
        return self._sums()["seen"]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": self.total, "counts": self.counts, "notes": self.notes}

    def summary(self) -> str:
        """'skipped 3 of 120 (2.5%): corrupt_image 2, empty_caption 1; long_caption 4 (kept)'."""
        counts, notes, seen = self.counts, self.notes, self.seen
        text = (f"skipped {self.total} of {seen} ({100 * self.total / max(seen, 1):.1f}%): "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
                if counts else f"no bad data in {seen} samples")
        return text + ("; " + ", ".join(f"{k} {v} (kept)" for k, v in notes.items()) if notes else "")

    def check(self, max_fraction: float, min_seen: int = 0) -> None:
        """Raise DataError when more than `max_fraction` of what was read was skipped (once at least
        `min_seen` were read: a few bad samples at the start of a stream say little)."""
        seen, total = self.seen, self.total
        if seen >= min_seen and total > max_fraction * seen:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1]))
            raise DataError(f"{total} of {seen} samples skipped ({reasons}) > --max_skip_fraction {max_fraction}; "
                            f"run `python train/validate_shards.py {self.source or 'DATA'}` to see which files")


# ----------------------------------------------------------------------------------------------
# Decoding one sample: bytes -> checked caption, RGB image
# ----------------------------------------------------------------------------------------------

def decode_caption(data: bytes) -> str:
    """Strict UTF-8 (a BOM is dropped), stripped. Non-UTF-8 bytes are skipped, not guessed: a Latin-1
    fallback turns a Shift-JIS or GBK caption into mojibake the model would learn from."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample("non_utf8_caption", f"byte 0x{data[e.start]:02x} at {e.start}") from None
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


def open_image(data: bytes, image_size: int, min_size: int = MIN_IMAGE_SIZE,
               max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes (any extension: the format comes from the content) and return the loaded image
    in its own mode, EXIF-rotated, with its stored (width, height). Raises SkipSample.

    A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides >= image_size,
    so a 4000 px photo costs a 500 px decode; `max_pixels` applies to what is decoded after that
    (large PNGs, decompression bombs). Short sides below min(min_size, image_size) are skipped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", str(e)) from None
    except Image.UnidentifiedImageError:
        raise SkipSample("corrupt_image", f"not an image format PIL reads (starts {data[:8]!r})") from None
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    size = image.size
    if min(size) < min(min_size, image_size):
        raise SkipSample("image_too_small", f"{size[0]}x{size[1]}, short side < {min(min_size, image_size)}")
    if image.format == "JPEG":
        image.draft(None, (image_size, image_size))
    if image.width * image.height > max_pixels:
        raise SkipSample("image_too_large", f"{image.width}x{image.height} > max_pixels {max_pixels}")
    try:
        image.load()  # PIL decodes lazily: truncation and CRC errors surface here
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:
        raise SkipSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    return image, size


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


_SRGB = ImageCms.createProfile("sRGB")


def to_srgb(image: Image.Image) -> Image.Image:
    """Colour management: an image with an embedded ICC profile (CMYK press profiles, Adobe RGB, Display P3,
    gray) or in CIELAB is converted to sRGB through littleCMS, so its colours mean what they meant to the
    camera or the designer; PIL's plain CMYK -> RGB formula and an ignored wide-gamut profile both shift
    them. sRGB-tagged and untagged images are returned as they are, and so is an image whose profile
    littleCMS cannot use (PIL's conversion follows)."""
    icc = image.info.get("icc_profile") or None
    if not (image.mode == "LAB" or (icc and image.mode in ("RGB", "RGBA", "CMYK", "L"))):
        return image
    transform = _srgb_transform(icc, image.mode)
    if transform is None:
        return image
    try:
        return ImageCms.applyTransform(image, transform)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image


@lru_cache(maxsize=64)
def _srgb_transform(icc: bytes | None, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The littleCMS transform from this profile (CIELAB when None) to sRGB, built once per distinct
    profile (web images share a few: Display P3, Adobe RGB, press CMYK); None: sRGB already, or unusable."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc)) if icc else ImageCms.createProfile("LAB")
        if icc and "sRGB" in ImageCms.getProfileDescription(source):
            return None
        return ImageCms.buildTransform(source, _SRGB, mode, "RGBA" if mode == "RGBA" else "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, by what the pixels mean rather than PIL's default conversion: embedded ICC
    profiles and CIELAB are colour-managed to sRGB (`to_srgb`); 16-bit and 32-bit grayscale are scaled to
    8 bits (PIL clips: 16-bit white 65535 would stay white but mid-gray 32768 would become white too);
    transparency is composited on white (PIL drops alpha, and fully transparent pixels often hold black,
    which gives logos a black box)."""
    image = to_srgb(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _HIGH_DEPTH:
        a = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max(initial=0) > 255):
            a = a / 65535 * 255  # 16-bit range (16-bit PNG and TIFF)
        elif mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255  # float images in [0, 1]
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def image_to_uint8(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL (any mode) -> (3, S, S) uint8: RGB (`to_rgb`), resize the short side to S, center crop.
    Smaller images are upscaled (bicubic); PIL's resize low-passes when it shrinks."""
    image = to_rgb(image)
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


# ----------------------------------------------------------------------------------------------
# Reading shards: our own tar reader (so shard damage is counted by kind), webdataset around it
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
    finally:
        stream.close()


def _read_shards(src: Iterator[dict], skips: SkipCounter, select=None, give_up: int = 0) -> Iterator[dict]:
    """Pipeline stage: {"url"} -> samples. With resampled shards the stream never ends, so `give_up`
    consecutive shards without a sample (all empty or unreadable) stop it with a DataError."""
    barren = 0
    for shard in src:
        got = False
        for sample in shard_samples(shard["url"], skips, select):
            got = True
            yield sample
        barren = 0 if got else barren + 1
        if give_up and barren >= give_up:
            raise DataError(f"{barren} shards in a row gave no sample ({skips.summary()}); run "
                            f"`python train/validate_shards.py {skips.source or 'DATA'}` to see what is wrong")


def decode_sample(sample: dict, image_size: int, min_image_size: int = MIN_IMAGE_SIZE,
                  max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, tuple[int, int], str]:
    """An image-text sample {ext: bytes} -> (loaded image in its own mode, stored size, caption), or
    SkipSample with the reason. Training (`image_text_dataset`) and `train/validate_shards.py` both
    decide here, so validation reports exactly what training will skip."""
    name = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
    if name is None:
        raise SkipSample("missing_image", f"members {sorted(k for k in sample if not k.startswith('__'))}")
    if "txt" not in sample:
        raise SkipSample("missing_caption")
    text = decode_caption(sample["txt"])
    image, size = open_image(sample[name], image_size, min_image_size, max_pixels)
    return image, size, text


def _image_text(src: Iterator[dict], skips: SkipCounter, image_size: int, uint8: bool, min_image_size: int,
                max_pixels: int) -> Iterator[tuple[torch.Tensor, str, str]]:
    for sample in src:
        skips.saw()
        try:
            image, _, text = decode_sample(sample, image_size, min_image_size, max_pixels)
            pixels = image_to_uint8(image, image_size)
        except SkipSample as s:
            skips.skip(s.reason, sample["__url__"], sample["__key__"], s.detail)
            continue
        except Exception as e:
            skips.skip("other", sample["__url__"], sample["__key__"], f"{type(e).__name__}: {e}")
            continue
        yield (pixels if uint8 else pixels.float().div_(255)), text, sample["__key__"]


def decode_token_sample(sample: dict, grid: int | None = None, num_tokens: int | None = None) -> tuple[np.ndarray, str]:
    """A token-shard sample {ext: bytes} -> (codes (h, w) integer array, caption), or SkipSample. With
    `grid` / `num_tokens` the codes must be grid x grid and in [0, num_tokens): a sample from another dVAE
    would otherwise break batching, or index past the embedding table mid-run. Training (`token_dataset`)
    and `train/validate_shards.py` both decide here."""
    if "codes.npy" not in sample:
        raise SkipSample("missing_codes")
    if "txt" not in sample:
        raise SkipSample("missing_caption")
    text = decode_caption(sample["txt"])
    try:  # allow_pickle=False: a data file never runs code (webdataset's default decoders unpickle .pyd)
        codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
    except Exception as e:
        raise SkipSample("corrupt_codes", f"{type(e).__name__}: {e}") from None
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
        raise SkipSample("corrupt_codes", f"{codes.dtype} array of shape {codes.shape}")
    if grid is not None and codes.shape != (grid, grid):
        raise SkipSample("corrupt_codes", f"shape {codes.shape}, expected ({grid}, {grid})")
    if num_tokens is not None and codes.size and (codes.min() < 0 or codes.max() >= num_tokens):
        bad = codes.max() if codes.max() >= num_tokens else codes.min()
        raise SkipSample("corrupt_codes", f"code {bad} outside [0, {num_tokens})")
    return codes, text


def _token_text(src: Iterator[dict], skips: SkipCounter, grid: int | None = None,
                num_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, str, str]]:
    for sample in src:
        skips.saw()
        try:
            codes, text = decode_token_sample(sample, grid, num_tokens)
        except SkipSample as s:
            skips.skip(s.reason, sample["__url__"], sample["__key__"], s.detail)
            continue
        yield torch.from_numpy(codes.astype(np.int64)), text, sample["__key__"]


class _Pipeline(wds.DataPipeline, wds.FluidInterface):
    """A webdataset DataPipeline with WebDataset's fluid methods (.batched, .shuffle, .map, ...)."""


def _dataset(spec: str | list[str], resampled: bool, shuffle: int, seed: int, skips: SkipCounter,
             split: bool = True, select=None) -> _Pipeline:
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
    stages.append(partial(_read_shards, skips=skips, select=select, give_up=10 * len(urls) if resampled else 0))
    if shuffle:
        stages.append(wds.shuffle(shuffle, seed=seed))
    return _Pipeline(*stages)


def image_text_dataset(spec: str | list[str], image_size: int, *, resampled: bool = False, shuffle: int = 0,
                       seed: int = 0, skips: SkipCounter | None = None, uint8: bool = False,
                       split: bool = True, min_image_size: int = MIN_IMAGE_SIZE,
                       max_pixels: int = MAX_PIXELS) -> _Pipeline:
    """Yields (image (3,S,S) float [0,1], caption str, key); with uint8=True the image stays uint8 (4x less
    to move between processes and to the GPU). split=False reads every shard here, with no split over
    ranks and DataLoader workers (for a caller that splits shards itself). Bad samples and shards are
    skipped and counted in `skips` by reason (SKIP_REASONS); `open_image` and `to_rgb` say what is kept."""
    skips = skips if skips is not None else SkipCounter()
    decode = partial(_image_text, skips=skips, image_size=image_size, uint8=uint8, min_image_size=min_image_size,
                     max_pixels=max_pixels)
    return _dataset(spec, resampled, shuffle, seed, skips, split).compose(decode)


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
                  skips: SkipCounter | None = None, grid: int | None = None,
                  num_tokens: int | None = None) -> _Pipeline:
    """Yields (codes (h, w) long, caption str, key); bad samples and shards are counted in `skips`, and so
    are codes not grid x grid or outside [0, num_tokens) when those are given (`decode_token_sample`)."""
    skips = skips if skips is not None else SkipCounter()
    return _dataset(spec, resampled, shuffle, seed, skips).compose(
        partial(_token_text, skips=skips, grid=grid, num_tokens=num_tokens))


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
