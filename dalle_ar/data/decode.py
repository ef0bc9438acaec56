"""Decoding one sample, and counting what is skipped: bytes -> checked caption, RGB image, code grid.

Every reader (the training datasets in `read.py`, `train/validate_shards.py`) decides here whether a sample
is usable, so validation reports exactly what training will skip. A sample that is not raises `SkipSample`
with a reason from `SKIP_REASONS`; `SkipCounter` counts them across DataLoader workers.
"""

from __future__ import annotations

import io
import logging
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps

from dalle_ar.config import DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


# ----------------------------------------------------------------------------------------------
# Skip accounting
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
NOTES = {"long_caption": "kept; the tokenizer truncates it to text_len, or to a CLIP's context_length "
                         "(counted where a tokenizer encodes it)",
         "no_scene": "kept without hard negative images: its key and caption are not an example of the shapes world "
                     "the shards' stats.json names (train_clip.py --hard_negative_images)"}
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
# Decoding a whole sample: {ext: bytes} -> (image, caption) or (codes, caption), or SkipSample
# ----------------------------------------------------------------------------------------------

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
