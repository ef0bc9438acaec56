"""Fuzzing the real readers (hypothesis): any tar bytes, image bytes and caption bytes yield a sample, a counted
skip or a one-line error (DataError), never a traceback, and each input is read within a bounded time."""

import io
import os
import tarfile
import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dalle_ar.config import DataError
from dalle_ar.data import synthetic
from dalle_ar.data.decode import SKIP_REASONS, SkipCounter
from dalle_ar.data.read import captions, image_text_dataset, token_dataset
from dalle_ar.data.write import encode_image

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECONDS_PER_INPUT = 10
PNG = encode_image(synthetic.make_example(0)[0], "png")


def read_everything(data: bytes) -> SkipCounter:
    """Every reader over one shard made of `data`; returns the image reader's skip counts."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "000000.tar")
        with open(path, "wb") as f:
            f.write(data)
        start, skips = time.monotonic(), SkipCounter()
        for image, text, key in image_text_dataset([path], 16, skips=skips):
            assert image.shape == (3, 16, 16) and text.strip() == text and text
        for codes, text, key in token_dataset(path, skips=SkipCounter()):
            assert codes.ndim == 2
        list(captions(path, SkipCounter()))
        assert time.monotonic() - start < SECONDS_PER_INPUT
    assert set(skips.counts) <= set(SKIP_REASONS)
    return skips


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@SETTINGS
@given(st.binary(max_size=8192))
def test_any_bytes_as_a_shard(data):
    read_everything(data)


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "dir/c", "d.e", "__key__", ".hidden"]),
                          st.sampled_from(["png", "jpg", "txt", "codes.npy", "json", "PNG", ""])), max_size=6),
       st.lists(st.binary(max_size=512), min_size=6, max_size=6), st.integers(0, 2048))
def test_any_tar_of_members_and_any_truncation(names, payloads, cut):
    members = [(f"{key}.{ext}" if ext else key, payload) for (key, ext), payload in zip(names, payloads)]
    data = tar_of(members)
    read_everything(data[: max(0, len(data) - cut)])


@SETTINGS
@given(st.binary(max_size=2048), st.binary(max_size=256), st.integers(0, len(PNG)))
def test_any_image_and_caption_bytes(noise, caption, keep):
    """A real PNG cut anywhere (or random bytes) beside any caption bytes: a sample or a skip by reason."""
    image = PNG[:keep] + noise if keep < len(PNG) else PNG
    skips = read_everything(tar_of([("000000001.png", image), ("000000001.txt", caption)]))
    assert skips.total <= 1


def test_a_stream_of_nothing_but_bad_samples_is_a_one_line_error():
    data = tar_of([(f"{i:09d}.txt", b"a caption") for i in range(1200)])  # no image in any sample
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "000000.tar")
        with open(path, "wb") as f:
            f.write(data)
        try:
            list(image_text_dataset([path], 16))
        except DataError as e:
            assert "\n" not in str(e) and "1000 samples in a row skipped, none usable (missing_image 1000" in str(e)
        else:
            raise AssertionError("no DataError")
