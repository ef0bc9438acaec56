"""Bad data and bad inputs: the real loaders, validate_shards, encode and the dVAE trainer over the corpus of
broken cases in tests/corpus.py; config validation; pickles refused."""

import json
import os
import pickle
import re
import runpy
import subprocess
import sys
import tarfile
from collections import Counter
from dataclasses import asdict

import corpus
import numpy as np
import pytest
import torch
from conftest import ROOT, run_script, script_env

from dalle_ar import models
from dalle_ar.checkpoint import save_pretrained
from dalle_ar.cli import parse
from dalle_ar.config import ConfigError, DalleConfig, DataError, TrainConfig, from_dict
from dalle_ar.data import decode
from dalle_ar.data.read import batches, captions, image_text_dataset, token_dataset
from dalle_ar.engine import build_ds_config
from dalle_ar.text import TextTokenizer, check_vocab, train_bpe
from dvae.config import DVAEConfig


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return corpus.write_corpus(tmp_path_factory.mktemp("bad_corpus"))


def read(path, skips, **kw):
    kw = {"max_pixels": corpus.MAX_PIXELS, "uint8": True, **kw}
    return {key: (image, text) for image, text, key in image_text_dataset(str(path), corpus.IMAGE_SIZE, skips=skips, **kw)}


def test_every_case_is_converted_or_skipped_with_its_reason(bad):
    skips = decode.SkipCounter(record=True)
    got = read(bad, skips)
    assert sorted(got) == sorted(corpus.expected_ok())
    assert skips.counts == corpus.expected_counts()
    by_key = {key: reason for reason, _, key, _ in skips.problems if key and reason != "truncated_shard"}
    assert by_key == {k: outcome for k, (_, outcome, _) in corpus.SAMPLES.items() if outcome != "ok"}
    assert {shard.rsplit("/", 1)[-1]: reason for reason, shard, _, _ in skips.problems
            if reason in decode.SHARD_REASONS} == corpus.SHARDS
    # samples read (27, and the 3 before the damage) + 4 shard-level problems (the sample lost in the damage is one)
    assert skips.seen == len(corpus.SAMPLES) + 3 + 4 and skips.total == 14
    for key, (_, outcome, pixels) in corpus.SAMPLES.items():
        if outcome != "ok":
            continue
        image, text = got[key]
        assert image.shape == (3, corpus.IMAGE_SIZE, corpus.IMAGE_SIZE) and image.dtype == torch.uint8
        assert text == corpus.CAPTIONS.get(key, corpus.CAPTION.decode())
        for (x, y), rgb in pixels.items():  # 16-bit white stays white, mid-gray stays mid-gray, alpha -> white
            assert np.abs(image[:, y, x].numpy().astype(int) - rgb).max() <= 3, (key, (x, y), image[:, y, x], rgb)


def test_skips_in_dataloader_workers_reach_the_main_process(bad):
    skips = decode.SkipCounter()
    ds = image_text_dataset(str(bad), corpus.IMAGE_SIZE, skips=skips, max_pixels=corpus.MAX_PIXELS)
    keys = [k for _, _, batch in batches(ds, 4, num_workers=2) for k in batch]
    assert sorted(keys) == sorted(corpus.expected_ok())
    assert skips.counts == corpus.expected_counts() and skips.seen == len(corpus.SAMPLES) + 7


def test_too_many_skips_stop_with_a_message_naming_validate_shards(bad):
    skips = decode.SkipCounter()
    read(bad, skips)
    skips.check(0.5)  # 14 of 34 is under half
    skips.check(0.01, min_seen=1000)  # too early to judge
    with pytest.raises(DataError, match=r"14 of 34 samples skipped \(corrupt_image 3, .*\) > --max_skip_fraction "
                                        r"0.01; run `python train/validate_shards.py .*bad_corpus.*` to see which files"):
        skips.check(0.01)
    assert skips.summary().startswith("skipped 14 of 34 (41.2%): corrupt_image 3, ")


def test_resampled_stream_over_only_empty_shards_stops_instead_of_spinning(bad):
    skips = decode.SkipCounter()
    ds = image_text_dataset([str(bad / "000002.tar"), str(bad / "000003.tar")], 32, resampled=True, skips=skips)
    with pytest.raises(DataError, match="20 shards in a row gave no sample"):
        next(iter(ds))
    assert skips.counts == {"empty_shard": 20}


def test_a_resampled_stream_reads_each_sound_shard_once_with_the_same_samples_and_skips(bad, monkeypatch):
    """A resampled stream keeps the samples of each shard it has read whole (read.SHARD_CACHE_BYTES) and gives them
    again when the shard comes again: the same samples in the same order and the same skip counts as reading the tar
    every time (a bad sample is skipped and counted at every pass; a truncated or empty shard is read, and counted,
    every time it comes), each sound shard's tar read once; a shard that does not fit is not kept."""
    from dalle_ar.data import read as reader

    opened, shard_samples = Counter(), reader.shard_samples

    def counted(url, *args, **kwargs):
        opened[url.rsplit("/", 1)[-1]] += 1
        return shard_samples(url, *args, **kwargs)

    monkeypatch.setattr(reader, "shard_samples", counted)

    def stream(cache_bytes):
        monkeypatch.setattr(reader, "SHARD_CACHE_BYTES", cache_bytes)
        opened.clear()
        skips = decode.SkipCounter()
        it = iter(image_text_dataset(str(bad), corpus.IMAGE_SIZE, resampled=True, seed=3, skips=skips, uint8=True,
                                     max_pixels=corpus.MAX_PIXELS))
        return [next(it) for _ in range(300)], skips.counts, dict(opened)

    cached, counts, opens = stream(reader.SHARD_CACHE_BYTES)
    plain, plain_counts, plain_opens = stream(0)
    assert [(key, text) for _, text, key in cached] == [(key, text) for _, text, key in plain]
    assert all(torch.equal(a, b) for (a, _, _), (b, _, _) in zip(cached, plain))
    assert counts == plain_counts and counts["truncated_shard"] > 1 and counts["corrupt_image"] > 2 * 3
    assert opens["000000.tar"] == 1 < plain_opens["000000.tar"]
    assert opens["000001.tar"] == plain_opens["000001.tar"] > 1 and opens["000002.tar"] == plain_opens["000002.tar"]
    small, small_counts, small_opens = stream(1000)  # smaller than any shard: nothing is kept, every tar read again
    assert [key for _, _, key in small] == [key for _, _, key in plain] and small_opens == plain_opens
    assert small_counts == plain_counts


def test_token_trainer_given_image_shards_stops_within_seconds_naming_encode(shapes_shards, tmp_path):
    """The DALLE-pytorch habit (image shards straight into the transformer trainer) once skipped samples forever at
    100% CPU: now the stream stops after MAX_SKIPS_IN_A_ROW skips with a one-line error naming train/encode.py."""
    import time

    tok = TextTokenizer(train_bpe(list(captions(str(shapes_shards))), vocab_size=300), text_len=16)
    tok.save(tmp_path / "tok/tokenizer.json")
    start = time.monotonic()
    proc = subprocess.run(["timeout", "120", sys.executable, "train/train_dalle.py", "--data", str(shapes_shards),
                           "--tokenizer", str(tmp_path / "tok"), "--text_vocab_size", str(tok.vocab_size), "--out",
                           str(tmp_path / "run"), "--dim", "32", "--depth", "1", "--heads", "2", "--steps", "3",
                           "--batch_size", "4", "--wandb", "disabled"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1000 samples in a row skipped, none usable (missing_codes 1000;"), last
    assert "these are image shards, not token shards: encode them first with `python train/encode.py" in last
    assert time.monotonic() - start < 100


def test_any_reader_stops_after_too_many_skips_in_a_row(bad, tmp_path):
    ds = token_dataset(str(bad), resampled=True, max_skips_in_a_row=50)  # image shards read as token shards
    with pytest.raises(DataError, match=r"50 samples in a row skipped, none usable \(.*missing_codes"):
        for _ in ds:
            pass
    assert len(list(token_dataset(str(bad), max_skips_in_a_row=0))) == 0  # 0 = no limit: one finite pass, all skipped


def test_limits_are_configurable(bad):
    skips = decode.SkipCounter()
    got = read(bad, skips, max_pixels=decode.MAX_PIXELS, min_image_size=1)  # the huge and the 1x1 image are kept
    assert {"huge_png", "tiny_1x1_png"} <= set(got) and "image_too_large" not in skips.counts
    assert (got["tiny_1x1_png"][0] == torch.tensor(corpus.RED, dtype=torch.uint8)[:, None, None]).all()


def test_captions_for_the_tokenizer_skip_empty_and_non_utf8(bad):
    skips = decode.SkipCounter()
    texts = list(captions(str(bad), skips))
    assert "" not in texts and corpus.LONG_CAPTION.strip() in texts and corpus.CAPTION.decode() in texts
    assert skips.counts["empty_caption"] == 2 and skips.counts["non_utf8_caption"] == 1


def test_icc_profiles_and_lab_are_colour_managed_to_srgb():
    """A skin tone tagged Adobe RGB is more saturated in sRGB (littleCMS: 180,120,90 -> about 199,121,88);
    sRGB-tagged pixels stay; an unusable profile falls back to PIL's conversion; CIELAB L=50 is mid gray."""
    import io

    from PIL import Image, ImageCms

    adobe = corpus.matrix_trc_profile(corpus.ADOBE_RGB, 2.2, "Adobe RGB (1998) test")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tone = Image.new("RGB", (32, 32), (180, 120, 90))
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        tone.save(buf, fmt, icc_profile=adobe, quality=100)
        image, _ = decode.open_image(buf.getvalue(), 32)
        r, g, b = (int(v) for v in np.asarray(decode.to_rgb(image))[16, 16])
        assert r >= 195 and abs(g - 120) <= 3 and b <= 90, (fmt, r, g, b)
    for profile in (srgb, b"not a profile"):
        tagged = tone.copy()
        tagged.info["icc_profile"] = profile
        assert np.asarray(decode.to_rgb(tagged))[0, 0].tolist() == [180, 120, 90]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    cmyk.info["icc_profile"] = srgb  # an RGB profile on CMYK pixels: unusable, PIL's formula instead
    assert np.asarray(decode.to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(decode.to_rgb(Image.new("LAB", (4, 4), (128, 128, 128))))[0, 0].tolist() == [119, 119, 119]


def test_long_captions_are_kept_truncated_and_noted(bad):
    tok = TextTokenizer(train_bpe([corpus.CAPTION.decode()] * 20, vocab_size=300), text_len=16, skips=decode.SkipCounter())
    ids = tok.encode([corpus.LONG_CAPTION, corpus.CAPTION.decode()])
    assert ids.shape == (2, 16) and tok.num_truncated == 1 and tok.skips.notes == {"long_caption": 1}
    assert tok.skips.summary().endswith("long_caption 1 (kept)")


def write_tar(path, members: dict[str, dict]) -> None:
    """A tar shard of {key: {ext: bytes or numpy array (saved as .npy)}}."""
    import io

    with tarfile.open(path, "w") as tar:
        for key, files in members.items():
            for ext, value in files.items():
                if isinstance(value, np.ndarray):
                    buf = io.BytesIO()
                    np.save(buf, value)
                    value = buf.getvalue()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))


def token_members():
    codes = np.arange(16, dtype=np.uint16).reshape(4, 4)
    return {"good": {"codes.npy": codes, "txt": b"a red circle"},
            "other_grid": {"codes.npy": codes[:3, :3], "txt": b"a blue square"},
            "past_codebook": {"codes.npy": codes + 60, "txt": b"a green star"},
            "negative": {"codes.npy": codes.astype(np.int16) - 1, "txt": b"a pink heart"},
            "no_codes": {"txt": b"x"}}


def test_token_samples_from_another_dvae_are_skipped_not_crashed_on(tmp_path):
    """A shard encoded with another dVAE (another grid, a larger codebook) would break batching or index past
    the embedding table mid-run; training gives the grid and codebook, and such samples are counted."""
    write_tar(tmp_path / "000000.tar", token_members())
    skips = decode.SkipCounter(record=True)
    got = [key for _, _, key in token_dataset(str(tmp_path / "000000.tar"), skips=skips, grid=4, num_tokens=64)]
    assert got == ["good"] and skips.counts == {"corrupt_codes": 3, "missing_codes": 1}
    details = {p[2]: p[3] for p in skips.problems}
    assert details["other_grid"] == "shape (3, 3), expected (4, 4)"
    assert details["past_codebook"] == "code 75 outside [0, 64)" and details["negative"] == "code -1 outside [0, 64)"


def test_validate_shards_checks_token_shards(tmp_path):
    write_tar(tmp_path / "000000.tar", token_members())
    write_tar(tmp_path / "000001.tar", {f"s{i}": {"codes.npy": np.full((4, 4), i, np.uint16), "txt": b"a red circle"}
                                        for i in range(40)})
    (tmp_path / "meta.json").write_text(json.dumps({"grid_size": 4, "num_tokens": 64}))
    proc = validate(str(tmp_path), "--json", str(tmp_path / "r.json"), "--num_workers", "1", "--max_skip_fraction", "0.1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert report["kind"] == "tokens" and report["ok"] == 41 and report["skip_reasons"] == {"corrupt_codes": 3, "missing_codes": 1}
    assert report["grids"] == {"4x4": 41} and report["codes_used"] == 40 and report["code_range"] == [0, 39]
    assert "000000.tar past_codebook: corrupt_codes (code 75 outside [0, 64))" in proc.stdout
    assert "codes used: 40 of 64" in proc.stdout
    # without meta.json nothing says what the grid should be: mixed grids fail, --grid_size names the samples
    (tmp_path / "meta.json").unlink()
    proc = validate(str(tmp_path), "--num_workers", "1", "--max_skip_fraction", "0.1")
    assert proc.returncode == 1 and "FAILED: several code grids ['3x3', '4x4']" in proc.stdout
    proc = validate(str(tmp_path), "--num_workers", "1", "--grid_size", "4", "--max_skip_fraction", "0.1")
    assert proc.returncode == 0 and "other_grid: corrupt_codes (shape (3, 3), expected (4, 4))" in proc.stdout


def test_token_shards_skip_bad_samples_and_never_unpickle(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = np.zeros((4, 4), np.uint16)
    evil_npy = tmp_path / "evil.npy"
    np.save(evil_npy, np.array([Exploit()], dtype=object), allow_pickle=True)
    members = {"good": {"codes.npy": good, "txt": b"a red circle"},
               "object_array": {"codes.npy": evil_npy.read_bytes(), "txt": b"x"},
               "pyd_member": {"codes.npy": good, "txt": b"a blue square", "pyd": pickle.dumps(Exploit())},
               "no_codes": {"txt": b"x"}, "no_caption": {"codes.npy": good}, "blank": {"codes.npy": good, "txt": b"  "},
               "wrong_shape": {"codes.npy": np.zeros(16, np.uint16), "txt": b"x"}}
    write_tar(tmp_path / "000000.tar", members)
    skips = decode.SkipCounter()
    got = {key: (codes, text) for codes, text, key in token_dataset(str(tmp_path / "000000.tar"), skips=skips)}
    assert sorted(got) == ["good", "pyd_member"] and got["pyd_member"][1] == "a blue square"
    assert skips.counts == {"corrupt_codes": 2, "missing_codes": 1, "missing_caption": 1, "empty_caption": 1}
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# validate_shards.py, encode.py and the dVAE trainer over the corpus
# ----------------------------------------------------------------------------------------------

def validate(*args):
    return subprocess.run([sys.executable, "train/validate_shards.py", *args], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)


def test_validate_shards_reports_every_problem_and_fails(bad, tmp_path):
    tok = train_bpe([corpus.CAPTION.decode()] * 20, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    proc = validate(str(bad), "--image_size", str(corpus.IMAGE_SIZE), "--max_pixels", str(corpus.MAX_PIXELS),
                    "--tokenizer", str(tmp_path), "--text_len", "16", "--json", str(tmp_path / "r.json"), "--num_workers", "1")
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert report["skip_reasons"] == corpus.expected_counts() and report["ok"] == len(corpus.expected_ok())
    assert report["notes"] == {"long_caption": 1}
    assert report["modes"] == {"RGB": 11, "RGBA": 2, "P": 2, "CMYK": 1, "LA": 1, "I;16": 1, "L": 1, "1": 1}
    assert report["wrong_extension"] == 2 and report["upscaled"] == 1
    for key, (_, outcome, _) in corpus.SAMPLES.items():
        if outcome != "ok":
            assert f"000000.tar {key}: {outcome}" in proc.stdout
    assert "000004.tar : unreadable_shard" in proc.stdout and "FAILED: 4 shard(s) unreadable, truncated or empty" in proc.stdout


def test_validate_shards_passes_clean_shards(shapes_shards):
    proc = validate(str(shapes_shards), "--num_workers", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "300 samples read: 300 usable, 0 skipped" in proc.stdout and proc.stdout.rstrip().endswith("OK")


def test_encode_survives_the_corpus(bad, tmp_path):
    from dvae import DiscreteVAE

    encode = runpy.run_path(str(ROOT / "train/encode.py"))["main"]
    cfg = DVAEConfig(image_size=64, n_hid=8, num_tokens=64)
    save_pretrained(DiscreteVAE(cfg), tmp_path / "dvae", {"kind": "dvae", "dvae": asdict(cfg)})
    encode(["--dvae", str(tmp_path / "dvae"), "--data", str(bad), "--out", str(tmp_path / "tokens"), "--num_workers", "2"])
    meta = json.loads((tmp_path / "tokens/meta.json").read_text())
    expected = {k: v for k, v in corpus.expected_counts().items() if k != "image_too_large"}  # default limit: kept
    assert meta["skipped"] == dict(sorted(expected.items())) and meta["num_samples"] == len(corpus.expected_ok()) + 1
    assert meta["num_shards"] == 5


def test_train_dvae_survives_the_corpus(bad, tmp_path):
    out = tmp_path / "dvae"
    run_script("train/train_dvae.py", "--data", str(bad), "--out", str(out), "--n_hid", "8", "--steps", "2",
               "--batch_size", "4", "--warmup_steps", "1", "--save_every", "0", "--max_skip_fraction", "1",
               "--wandb", "disabled")
    assert (out / "export/model.safetensors").exists() and json.loads((out / "reconstruction.json").read_text())["images"] == 21


def test_clip_scripts_count_captions_longer_than_its_context(bad, tmp_path):
    proc = run_script("train/train_clip.py", "--data", str(bad), "--out", str(tmp_path / "clip"), "--steps", "4",
                      "--batch_size", "8", "--warmup_steps", "1", "--embed_dim", "32", "--vision_layers", "1",
                      "--vision_width", "64", "--patch_size", "16", "--text_width", "32", "--text_heads", "2",
                      "--text_layers", "1", "--context_length", "16", "--save_every", "0", "--max_skip_fraction", "1",
                      "--wandb", "disabled", "--no-progress")
    assert re.search(r"long_caption [1-9]\d* \(kept\)", proc.stdout), proc.stdout[-2000:]
    # the unCLIP embeddings of the same corpus: one warning naming the caption, then a count of them all
    proc = run_script("train/precompute_clip.py", "--clip", str(tmp_path / "clip/export"), "--data", str(bad),
                      "--out", str(tmp_path / "emb"), "--num_workers", "0")
    assert "long captions: 1 longer than the CLIP's 16 tokens" in proc.stdout, proc.stdout[-2000:]
    assert proc.stderr.count("CLIP reads 16 tokens, the caption 'a small red circle on the left a small") == 1


# ----------------------------------------------------------------------------------------------
# Configs and weights
# ----------------------------------------------------------------------------------------------

def test_dvae_image_size_must_divide_by_the_downsampling_factor():
    with pytest.raises(ConfigError, match=r"image_size 100 is not divisible by the downsampling factor 8 .*"
                                          r"use --image_size 96 or 104"):
        DVAEConfig(image_size=100)
    assert DVAEConfig(image_size=100, group_count=3).grid_size == 25


def test_config_file_with_wrong_types_or_unknown_keys_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"run.json: steps must be int, got '100' \(str\)"):
        from_dict(TrainConfig, {"steps": "100"}, "run.json")
    with pytest.raises(ConfigError, match="resume must be bool, got 1"):
        from_dict(TrainConfig, {"resume": 1}, "run.json")
    assert from_dict(TrainConfig, {"lr": 1}, "run.json").lr == 1.0  # an int is a fine float
    for data, message in (({"train": {"batch_size": 8.5}}, "batch_size must be int, got 8.5"),
                          ({"model": {"dimm": 64}}, "unknown DalleConfig field(s) ['dimm']"),
                          ({"train": {"max_skip_fraction": 2}}, "max_skip_fraction: 2.0 is not in [0, 1]")):
        (tmp_path / "run.json").write_text(json.dumps(data))
        with pytest.raises(SystemExit):
            parse("x", DalleConfig, TrainConfig, argv=["--config", str(tmp_path / "run.json")])
        assert message in capsys.readouterr().err


def test_ds_config_batch_size_must_match_micro_x_accum_x_world(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8}))
    cfg = TrainConfig(ds_config=str(path), batch_size=8, grad_accum=1, zero_stage=0)
    with pytest.raises(ConfigError, match=r"train_batch_size 64 != batch_size 8 x grad_accum 1 x 2 rank\(s\) = 16; "
                                          r"remove train_batch_size \(it is derived\) or pass --grad_accum 4"):
        build_ds_config(cfg, world=2)
    ds = build_ds_config(TrainConfig(ds_config=str(path), batch_size=8, grad_accum=4, zero_stage=0), world=2)
    assert "train_batch_size" not in ds and ds["gradient_accumulation_steps"] == 4


def test_vocab_mismatch_between_tokenizer_and_model_is_refused(tmp_path):
    tok = TextTokenizer(train_bpe([corpus.CAPTION.decode()] * 20, vocab_size=300), text_len=16)
    check_vocab(tok, DalleConfig(text_vocab_size=tok.vocab_size, text_len=16), "x")
    with pytest.raises(ConfigError, match=rf"export/config.json: the model has a 512-token BPE vocabulary "
                                          rf"\(text_vocab_size\) but the tokenizer has {tok.vocab_size}"):
        check_vocab(tok, DalleConfig(text_vocab_size=512, text_len=16), "export/config.json")
    with pytest.raises(ConfigError, match="reads 32 text tokens"):
        check_vocab(tok, DalleConfig(text_vocab_size=tok.vocab_size, text_len=32), "x")
    tok.save(tmp_path / "tok/tokenizer.json")
    proc = subprocess.run([sys.executable, "train/train_dalle.py", "--data", str(tmp_path), "--tokenizer", str(tmp_path / "tok"),
                           "--text_vocab_size", "512", "--out", str(tmp_path / "run")], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "512-token BPE vocabulary (text_vocab_size) but the tokenizer has" in proc.stderr


def test_weights_from_another_config_name_the_values_that_differ(tmp_path):
    from dalle_ar.model import DalleTransformer

    small, big = DalleConfig(dim=32, depth=1, heads=2), DalleConfig(dim=64, depth=1, heads=2)
    save_pretrained(DalleTransformer(small), tmp_path / "m", {"model": asdict(small)})
    (tmp_path / "m/config.json").write_text(json.dumps({"model": asdict(big)}))  # e.g. copied from another run
    with pytest.raises(ConfigError, match=r"weights are from a different config than .*config.json \(model.dim 32 vs 64: "
                                          r"weights vs config.json\); e.g. .* is \[.*32.*\] in the weights"):
        models.load(tmp_path / "m", kind="dalle")


def test_pickled_weights_need_allow_pickle_and_never_run_code(tmp_path):
    from dvae import DiscreteVAE

    cfg = DVAEConfig(n_hid=8, num_tokens=64)
    model = DiscreteVAE(cfg)
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok/config.json").write_text(json.dumps({"dvae": asdict(cfg)}))
    torch.save(model.state_dict(), tmp_path / "ok/pytorch_model.bin")
    with pytest.raises(ConfigError, match="pytorch_model.bin: a pickle, and unpickling can run code; .* --allow-pickle"):
        models.load(tmp_path / "ok", kind="dvae")
    loaded, _ = models.load(tmp_path / "ok", kind="dvae", allow_pickle=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil/config.json").write_text(json.dumps({"dvae": asdict(cfg)}))
    torch.save({"encoder.w": torch.zeros(1), "payload": Exploit()}, tmp_path / "evil/model.pt")
    with pytest.raises(ConfigError, match="model.pt: refused, it holds more than tensors"):
        models.load(tmp_path / "evil", kind="dvae", allow_pickle=True)
    assert not marker.exists()
