import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script

from dalle_ar.config import ConfigError
from dalle_ar.data import decode, read, synthetic, write


def test_image_shards_round_trip(tmp_path):
    examples = [(f"{i:09d}", *synthetic.make_example(i)) for i in range(25)]
    assert write.write_image_shards(examples, tmp_path, samples_per_shard=10) == 25
    assert len(read.shard_urls(str(tmp_path))) == 3
    assert list(read.captions(str(tmp_path))) == [text for _, _, text in examples]  # text only, in order
    got = {key: (img, txt) for img, txt, key in read.image_text_dataset(str(tmp_path), 64)}
    assert len(got) == 25
    for key, image, text in examples:
        img, txt = got[key]
        assert txt == text
        expected = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
        assert torch.equal(img, expected)  # PNG is lossless


def test_synthetic_shards_are_the_same_for_any_number_of_workers(tmp_path):
    import tarfile

    def members(out):
        with tarfile.open(out / "000001.tar") as tar:  # the second shard: workers' chunks cross its boundaries
            return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]

    for workers in (1, 3):
        run_script("train/make_shards.py", "synthetic", "--out", str(tmp_path / f"w{workers}"), "--num", "150",
                   "--samples_per_shard", "50", "--workers", str(workers))
    one, three = members(tmp_path / "w1"), members(tmp_path / "w3")
    assert len(one) == 100 and one == three  # the PNG and caption of samples 50-99, in order
    image, caption = synthetic.make_example(50)
    assert one[:2] == [("000000050.png", write.encode_image(image, "png")), ("000000050.txt", caption.encode())]


def test_import_folder_with_sidecar_captions(tmp_path):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    for i in range(5):
        image, text = synthetic.make_example(i)
        image.save(src / f"img{i}.jpg" if i % 2 else src / f"img{i}.png")
        if i != 3:
            (src / f"img{i}.txt").write_text(text + "\n")
    stats = write.import_folder(tmp_path / "src", tmp_path / "out")
    assert stats == {"written": 4, "skipped": {"missing_caption": 1}, "converted": {}}
    texts = sorted(t for _, t, _ in read.image_text_dataset(str(tmp_path / "out"), 32))
    assert texts == sorted(synthetic.make_example(i)[1] for i in (0, 1, 2, 4))


def test_token_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    examples = [(f"{i:04d}", rng.integers(0, 8192, (32, 32)), f"caption {i}") for i in range(7)]
    write.write_token_shards(examples, tmp_path)
    got = sorted(read.token_dataset(str(tmp_path)), key=lambda x: x[2])
    for (key, codes, text), (c, t, k) in zip(examples, got):
        assert k == key and t == text and torch.equal(c, torch.from_numpy(codes.astype(np.int64)))


def test_missing_shards_error_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_shards.py"):
        read.shard_urls(str(tmp_path / "nothing"))


def test_image_to_tensor_handles_any_mode_and_size():
    for mode in ("L", "RGBA", "P", "CMYK"):
        t = decode.image_to_tensor(Image.new(mode, (100, 60)), 32)
        assert t.shape == (3, 32, 32) and 0 <= t.min() <= t.max() <= 1


def test_resampled_stream_is_reproducible_across_runs_and_distinct_per_rank(shapes_shards):
    """The same seed gives the same stream in a new process (so resume can fast-forward to its data
    position); another rank gets another stream."""
    import subprocess
    import sys

    from conftest import ROOT, script_env

    code = ("import sys; from dalle_ar.data.read import image_text_dataset\n"
            f"ds = image_text_dataset({str(shapes_shards)!r}, 16, resampled=True, shuffle=50, seed=int(sys.argv[1]))\n"
            "keys = []\n"
            "for _, _, k in ds:\n"
            "    keys.append(k)\n"
            "    if len(keys) == 60: break\n"
            "print(' '.join(keys))")

    def stream(seed, rank):
        env = {**script_env(), "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code, str(seed)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    first = stream(0, 0)
    assert len(first) == 60 and stream(0, 0) == first
    assert stream(0, 1) != first and stream(1, 0) != first


def test_one_loader_worker_reads_the_training_stream_of_none(shapes_shards):
    """`--num_workers 1` moves decoding into a second process and changes nothing else: the trainers' resampled,
    shuffled stream arrives in the same batches, pixels and all (the demo decodes so, next to its training)."""
    from dalle_ar.data.read import batches, image_text_dataset, infinite

    def first(workers, n=15):
        ds = image_text_dataset(str(shapes_shards), 16, resampled=True, shuffle=50, seed=3)
        it = infinite(batches(ds, 4, workers, partial=False))
        return [next(it) for _ in range(n)]

    inline, worker = first(0), first(1)
    assert [b[2] for b in worker] == [b[2] for b in inline]
    assert all(torch.equal(w[0], i[0]) and w[1] == i[1] for w, i in zip(worker, inline))


def _folder(tmp_path, n=4):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(n):
        image, text = synthetic.make_example(i)
        image.save(src / f"img{i}.png")
        (src / f"img{i}.txt").write_text(text)
    return src


def test_make_shards_folder_survives_a_latin1_caption(tmp_path):
    """One caption in Latin-1 (`caf\\xe9`) is skipped and counted, or converted with a declared fallback; the import
    does not die with a UnicodeDecodeError."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, script_env

    src = _folder(tmp_path)
    (src / "img1.txt").write_bytes(b"a caf\xe9 on the left")
    (src / "img2.txt").write_bytes(b"  \n")
    for fallback, out in ((None, tmp_path / "strict"), ("cp1252", tmp_path / "cp1252")):
        cmd = [sys.executable, "train/make_shards.py", "folder", "--src", str(src), "--out", str(out)]
        proc = subprocess.run(cmd + (["--caption_fallback", fallback] if fallback else []), cwd=ROOT, env=script_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        stats = json.loads((out / "stats.json").read_text())
        texts = sorted(t for _, t, _ in read.image_text_dataset(str(out), 32))
        if fallback is None:
            assert stats["written"] == 2 and stats["skipped"] == {"non_utf8_caption": 1, "empty_caption": 1}
            assert "img1.txt: skipped (non_utf8_caption" in proc.stdout
        else:
            assert stats["written"] == 3 and stats["converted"] == {"cp1252_caption": 1}
            assert "a café on the left" in texts
    proc = subprocess.run([sys.executable, "train/make_shards.py", "folder", "--src", str(src), "--out",
                           str(tmp_path / "x"), "--caption_fallback", "klingon"], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --caption_fallback klingon")


def test_interrupted_import_leaves_a_marked_partial_output_that_the_next_run_replaces(tmp_path):
    src = _folder(tmp_path, n=6)
    (src / "img4.png").unlink()
    (src / "img4.png").symlink_to(tmp_path / "gone.png")  # listed, then unreadable mid-run: the import dies
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        write.import_folder(src, out, samples_per_shard=2)
    assert not out.exists() and any((tmp_path / "out.partial").glob("*.tar"))  # never a smaller 'complete' set
    (src / "img4.png").unlink()
    synthetic.make_example(4)[0].save(src / "img4.png")
    assert write.import_folder(src, out, samples_per_shard=2)["written"] == 6
    assert not (tmp_path / "out.partial").exists() and len(list(out.glob("*.tar"))) == 3
    with pytest.raises(ConfigError, match="already holds shards"):
        write.import_folder(src, out)


def test_remote_shards_reach_webdataset_gopen_through_pipes(shapes_shards):
    """img2dataset output in a bucket: any scheme webdataset opens is passed through (here `pipe:cat`, the stand-in
    for `pipe:aws s3 cp s3://bucket/x.tar -` or `pipe:gsutil cat gs://...`); s3:// itself gets the pipe recipe."""
    spec = f"pipe:cat {shapes_shards}/{{000000..000002}}.tar"
    urls = read.shard_urls(spec)
    assert urls == [f"pipe:cat {shapes_shards}/{i:06d}.tar" for i in range(3)]
    skips = decode.SkipCounter()
    assert len(list(read.image_text_dataset(spec, 32, skips=skips))) == 300 and skips.total == 0
    assert read.shard_urls("gs://bucket/{00000..00001}.tar") == ["gs://bucket/00000.tar", "gs://bucket/00001.tar"]
    with pytest.raises(ConfigError, match=r"s3://bucket/00000.tar: webdataset cannot open s3: URLs; .*--data "
                                          r"'pipe:aws s3 cp s3://bucket/00000.tar -'"):
        read.shard_urls("s3://bucket/{00000..00999}.tar")


def test_a_larger_synthetic_render_starts_with_the_smaller_ones_shards(tmp_path):
    """`make demo DALLE_IMAGES=N` renders N images and gives the dVAE, tokenizer and CLIP the first shards by a
    brace pattern: those must hold exactly the images and captions a render of that size alone holds."""
    run_script("train/make_shards.py", "synthetic", "--out", str(tmp_path / "small"), "--num", "20", "--samples_per_shard", "10")
    run_script("train/make_shards.py", "synthetic", "--out", str(tmp_path / "large"), "--num", "50", "--samples_per_shard", "10")
    first = str(tmp_path / "large" / "{000000..000001}.tar")
    assert len(read.shard_urls(first)) == 2 and len(read.shard_urls(str(tmp_path / "large"))) == 5

    def samples(spec):
        return [(key, text, img) for img, text, key in read.image_text_dataset(spec, 64)]

    small, prefix = samples(str(tmp_path / "small")), samples(first)
    assert [s[:2] for s in small] == [s[:2] for s in prefix] and len(small) == 20
    assert all(torch.equal(a[2], b[2]) for a, b in zip(small, prefix))
    assert {key for key, _, _ in samples(str(tmp_path / "large"))} > {key for key, _, _ in small}
