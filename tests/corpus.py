"""A small bad-data corpus: every kind of broken or unusual input the loaders must survive, with the
outcome each one must have.

  python tests/corpus.py OUT_DIR       (writes the shards; the tests call `write_corpus`)

Shards (plain tar files, written member by member so names and bytes are exactly what a broken
crawl produces):

  000000.tar  one sample per case in SAMPLES (images in every mode, wrong extensions, bad captions, ...)
  000001.tar  three good samples, then the tar breaks off inside the fourth sample's image
  000002.tar  a valid tar with no files
  000003.tar  a zero-byte file
  000004.tar  not a tar at all

Read it with IMAGE_SIZE and MAX_PIXELS (a small limit stands in for a really huge image). Each
sample's outcome is "ok" or the skip reason (a key of `dalle_ar.data.decode.SKIP_REASONS`); PIXELS
gives the RGB values a converted image must have at a few points of the (3, S, S) output.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
MAX_PIXELS = 200 * 200           # the "huge" PNG has 300x300; the 400x400 JPEG decodes at 1/8 (50x50)
LONG_CAPTION = "a small red circle on the left " * 150  # ~4.6k characters, hundreds of BPE tokens

RED, WHITE, BLACK = (220, 40, 40), (255, 255, 255), (0, 0, 0)
LEFT, RIGHT = (IMAGE_SIZE // 4, IMAGE_SIZE // 2), (3 * IMAGE_SIZE // 4, IMAGE_SIZE // 2)  # (x, y) in the output


def matrix_trc_profile(primaries, gamma: float, name: str) -> bytes:
    """A minimal ICC v2 RGB display profile (D50 white, XYZ colorants, one gamma): enough for littleCMS,
    so the tests can tag images with a wide-gamut space without profile files on disk."""
    import struct

    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(v):
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    text = name.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + struct.pack(">IIHB", 0, 0, 0, 0) + b"\0" * 67
    tags = [(b"desc", desc), (b"wtpt", xyz(D50)), (b"rXYZ", xyz(primaries[0])), (b"gXYZ", xyz(primaries[1])),
            (b"bXYZ", xyz(primaries[2])), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += b"\0" * (-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (struct.pack(">I", offset + len(data)) + b"\0" * 4 + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + b"".join(s15(c) for c in D50) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


D50 = (0.9642, 1.0, 0.8249)
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))  # D50-adapted


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _halves(mode: str, left, right, size: int = 64) -> Image.Image:
    """A square image: left half one value, right half another (both survive resize + centre crop)."""
    image = Image.new(mode, (size, size), left)
    image.paste(Image.new(mode, (size // 2, size), right), (size // 2, 0))
    return image


def _rgb(size=(64, 64), color=RED) -> Image.Image:
    return Image.new("RGB", size, color)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)  # index 0 black (transparent), index 1 red
    image.paste(1, (32, 0, 64, 64))
    return _encode(image, "PNG", transparency=0)


def _gray16() -> bytes:
    left = np.full((64, 32), 65535, np.uint16)   # 16-bit white must stay white,
    right = np.full((64, 32), 32768, np.uint16)  # and mid-gray must not be clipped to white
    return _encode(Image.fromarray(np.hstack([left, right])), "PNG")


def _corrupt_png() -> bytes:
    data = bytearray(_encode(_rgb(), "PNG"))
    data[data.find(b"IDAT") + 10] ^= 0xFF  # damage the compressed pixel data
    return bytes(data)


CAPTION = "a small red circle on the left".encode()

# key -> (members {ext: bytes}, expected outcome, pixel checks {(x, y): rgb} on the output image)
SAMPLES: dict[str, tuple[dict[str, bytes], str, dict]] = {
    "rgb_png": ({"png": _encode(_rgb(), "PNG"), "txt": CAPTION}, "ok", {LEFT: RED}),
    "rgb_jpg": ({"jpg": _encode(_rgb(), "JPEG", quality=95), "txt": CAPTION}, "ok", {LEFT: RED}),
    "cmyk_jpg": ({"jpg": _encode(_halves("CMYK", (0, 0, 0, 0), (0, 0, 0, 255)), "JPEG", quality=95), "txt": CAPTION},
                 "ok", {LEFT: WHITE, RIGHT: BLACK}),
    "rgba_png": ({"png": _encode(_halves("RGBA", (0, 0, 0, 0), (*RED, 255)), "PNG"), "txt": CAPTION},
                 "ok", {LEFT: WHITE, RIGHT: RED}),
    "la_png": ({"png": _encode(_halves("LA", (0, 0), (0, 255)), "PNG"), "txt": CAPTION},
               "ok", {LEFT: WHITE, RIGHT: BLACK}),
    "palette_transparent_png": ({"png": _palette_with_transparency(), "txt": CAPTION}, "ok", {LEFT: WHITE, RIGHT: RED}),
    "palette_png": ({"png": _encode(_rgb().quantize(4), "PNG"), "txt": CAPTION}, "ok", {LEFT: RED}),
    "gray16_png": ({"png": _gray16(), "txt": CAPTION}, "ok", {LEFT: WHITE, RIGHT: (128, 128, 128)}),
    "gray_png": ({"png": _encode(Image.new("L", (64, 64), 100), "PNG"), "txt": CAPTION}, "ok", {LEFT: (100, 100, 100)}),
    "bilevel_png": ({"png": _encode(_halves("1", 1, 0), "PNG"), "txt": CAPTION}, "ok", {LEFT: WHITE, RIGHT: BLACK}),
    "small_upscaled_png": ({"png": _encode(_rgb((20, 40)), "PNG"), "txt": CAPTION}, "ok", {LEFT: RED}),
    "tiny_1x1_png": ({"png": _encode(_rgb((1, 1)), "PNG"), "txt": CAPTION}, "image_too_small", {}),
    "huge_png": ({"png": _encode(_rgb((300, 300)), "PNG"), "txt": CAPTION}, "image_too_large", {}),
    "big_jpg_drafted": ({"jpg": _encode(_rgb((400, 400)), "JPEG", quality=95), "txt": CAPTION}, "ok", {LEFT: RED}),
    "png_named_jpg": ({"jpg": _encode(_halves("RGBA", (0, 0, 0, 0), (*RED, 255)), "PNG"), "txt": CAPTION},
                      "ok", {LEFT: WHITE, RIGHT: RED}),
    "jpg_named_png": ({"png": _encode(_rgb(), "JPEG", quality=95), "txt": CAPTION}, "ok", {LEFT: RED}),
    "uppercase_ext": ({"JPG": _encode(_rgb(), "JPEG", quality=95), "TXT": CAPTION}, "ok", {LEFT: RED}),
    "truncated_jpg": ({"jpg": _encode(_rgb(), "JPEG")[:300], "txt": CAPTION}, "corrupt_image", {}),
    "corrupt_png": ({"png": _corrupt_png(), "txt": CAPTION}, "corrupt_image", {}),
    "not_an_image": ({"jpg": b"<html>404 not found</html>", "txt": CAPTION}, "corrupt_image", {}),
    "missing_caption": ({"png": _encode(_rgb(), "PNG")}, "missing_caption", {}),
    "missing_image": ({"txt": CAPTION, "json": b"{}"}, "missing_image", {}),
    "empty_caption": ({"png": _encode(_rgb(), "PNG"), "txt": b""}, "empty_caption", {}),
    "whitespace_caption": ({"png": _encode(_rgb(), "PNG"), "txt": b" \n\t \r\n"}, "empty_caption", {}),
    "non_utf8_caption": ({"png": _encode(_rgb(), "PNG"), "txt": "café au lait".encode("latin-1")}, "non_utf8_caption", {}),
    "bom_caption": ({"png": _encode(_rgb(), "PNG"), "txt": b"\xef\xbb\xbf" + CAPTION}, "ok", {LEFT: RED}),
    "long_caption": ({"png": _encode(_rgb(), "PNG"), "txt": LONG_CAPTION.encode()}, "ok", {LEFT: RED}),
}
CAPTIONS = {"bom_caption": CAPTION.decode(), "long_caption": LONG_CAPTION.strip()}  # what the loader yields
TRUNCATED_GOOD = ["t0", "t1", "t2"]  # 000001.tar: read before the damage
# shard -> the shard-level outcome it must be counted as
SHARDS = {"000001.tar": "truncated_shard", "000002.tar": "empty_shard", "000003.tar": "empty_shard",
          "000004.tar": "unreadable_shard"}


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_corpus(out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "000000.tar").write_bytes(_tar([(f"{key}.{ext}", data) for key, (members, _, _) in SAMPLES.items()
                                           for ext, data in members.items()]))
    good = [(f"{key}.{ext}", data) for key in [*TRUNCATED_GOOD, "t3"]
            for ext, data in (("png", _encode(_rgb(), "PNG")), ("txt", CAPTION))]
    whole = _tar(good)
    cut = whole.index(b"t3.png") + 512 + 40  # 40 bytes into the fourth sample's image data
    (out / "000001.tar").write_bytes(whole[:cut])
    (out / "000002.tar").write_bytes(_tar([]))
    (out / "000003.tar").write_bytes(b"")
    (out / "000004.tar").write_bytes(b"this is not a tar file\n" * 40)
    return out


def expected_counts() -> dict[str, int]:
    """Skip reason -> count over the whole corpus."""
    counts: dict[str, int] = {}
    for _, outcome, _ in SAMPLES.values():
        if outcome != "ok":
            counts[outcome] = counts.get(outcome, 0) + 1
    for outcome in SHARDS.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def expected_ok() -> list[str]:
    return [key for key, (_, outcome, _) in SAMPLES.items() if outcome == "ok"] + TRUNCATED_GOOD


if __name__ == "__main__":
    print(write_corpus(sys.argv[1] if len(sys.argv) > 1 else "bad_corpus"))
