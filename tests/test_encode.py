"""train/encode.py: one token shard per image shard, the dVAE's own codes, any worker count, resumable."""

import json
import runpy
import shutil
from dataclasses import asdict

import pytest
import torch
from conftest import ROOT

from dalle_ar import models
from dalle_ar.checkpoint import save_pretrained
from dalle_ar.config import ConfigError
from dalle_ar.data import read, synthetic, write
from dvae import DiscreteVAE
from dvae.config import DVAEConfig

encode = runpy.run_path(str(ROOT / "train/encode.py"))["main"]
NAMES = ["000000.tar", "000001.tar", "000002.tar"]


def export_dvae(path, seed):
    cfg = DVAEConfig(image_size=64, n_hid=8, num_tokens=64)
    torch.manual_seed(seed)
    return save_pretrained(DiscreteVAE(cfg), path, {"kind": "dvae", "dvae": asdict(cfg)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """25 images in shards of 10, 10, 5; batches of 4, so shards end in partial batches; a clean run."""
    d = tmp_path_factory.mktemp("encode")
    write.write_image_shards(((f"{i:09d}", *synthetic.make_example(i)) for i in range(25)), d / "images",
                              samples_per_shard=10)
    export_dvae(d / "dvae", seed=0)
    args = ["--dvae", str(d / "dvae"), "--data", str(d / "images"), "--batch_size", "4"]
    encode([*args, "--out", str(d / "clean"), "--num_workers", "0"])
    return d, args


def contents(out):
    """Every token shard's bytes (reproducible: fixed tar mtime), every record and meta.json."""
    return ({p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))},
            {p.name: json.loads(p.read_text()) for p in sorted((out / "progress").glob("*.json"))},
            json.loads((out / "meta.json").read_text()))


def test_each_image_shard_becomes_a_token_shard_of_the_dvae_codes(setup):
    d, _ = setup
    out = d / "clean"
    assert sorted(p.name for p in out.iterdir()) == [*NAMES, "meta.json", "progress"]
    meta = json.loads((out / "meta.json").read_text())
    assert {k: meta[k] for k in ("num_samples", "num_tokens", "grid_size", "skipped")} == \
        {"num_samples": 25, "num_tokens": 64, "grid_size": 8, "skipped": {}}
    model, _ = models.load(d / "dvae")
    for name, size in zip(NAMES, (10, 10, 5)):
        images, texts, keys = zip(*read.image_text_dataset(str(d / "images" / name), 64))
        codes, captions, got_keys = zip(*read.token_dataset(str(out / name)))
        assert list(got_keys) == list(keys) and len(keys) == size and list(captions) == list(texts)
        assert torch.equal(torch.stack(codes), model.encode(torch.stack(images)))
        assert json.loads((out / "progress" / name.replace(".tar", ".json")).read_text())["num_samples"] == size


def test_two_workers_write_the_same_shards_as_one_process(setup, tmp_path):
    d, args = setup
    encode([*args, "--out", str(tmp_path), "--num_workers", "2"])
    assert contents(tmp_path) == contents(d / "clean")


def test_crash_mid_shard_leaves_no_partial_shard_and_a_rerun_finishes_the_rest(setup, tmp_path, monkeypatch, capsys):
    d, args = setup
    out = tmp_path / "tokens"
    real, calls = DiscreteVAE.encode, []

    def crash_on_fifth_batch(self, images):  # batches 1-3 are shard 0, batch 5 is inside shard 1
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return real(self, images)

    monkeypatch.setattr(DiscreteVAE, "encode", crash_on_fifth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode([*args, "--out", str(out), "--num_workers", "0"])
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "progress"]  # no .tar.tmp, no meta
    assert [p.name for p in (out / "progress").iterdir()] == ["000000.json"]
    (out / "000002.tar.tmp").write_bytes(b"left by a killed run")
    first = (out / "000000.tar").stat().st_ino

    capsys.readouterr()
    encode([*args, "--out", str(out), "--num_workers", "2"])
    assert "1 of 3 shards already encoded" in capsys.readouterr().out
    assert (out / "000000.tar").stat().st_ino == first  # not rewritten
    assert contents(out) == contents(d / "clean") and not list(out.glob("*.tmp"))


def test_rerun_redoes_exactly_the_shards_missing_a_tar_or_a_record(setup, tmp_path, capsys):
    d, args = setup
    out = tmp_path / "tokens"
    shutil.copytree(d / "clean", out)
    (out / "000001.tar").unlink()
    (out / "progress/000002.json").unlink()  # crash between writing the record and renaming the shard
    kept = (out / "000000.tar").stat().st_ino
    capsys.readouterr()
    encode([*args, "--out", str(out), "--num_workers", "2"])
    assert "1 of 3 shards already encoded" in capsys.readouterr().out
    assert (out / "000000.tar").stat().st_ino == kept
    assert contents(out) == contents(d / "clean")


def test_resuming_with_another_dvae_is_refused(setup, tmp_path):
    d, args = setup
    out = tmp_path / "tokens"
    shutil.copytree(d / "clean", out)
    export_dvae(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match="another dVAE.*--out"):
        encode(["--dvae", str(tmp_path / "other"), "--data", str(d / "images"), "--out", str(out)])


def test_a_stray_token_shard_in_out_is_refused(setup, tmp_path):
    d, args = setup
    out = tmp_path / "tokens"
    shutil.copytree(d / "clean", out)
    shutil.copy(out / "000000.tar", out / "old_layout_000000.tar")  # e.g. from an encode before per-shard outputs
    with pytest.raises(ConfigError, match="old_layout_000000.tar: a token shard with no record"):
        encode([*args, "--out", str(out)])


def test_skips_in_worker_processes_reach_the_records_and_meta(setup, tmp_path):
    import webdataset as wds

    d, _ = setup
    images = tmp_path / "images"
    shutil.copytree(d / "images", images)
    image, text = synthetic.make_example(99)
    with wds.TarWriter(str(images / "000003.tar")) as sink:
        sink.write({"__key__": "good", "png": write.encode_image(image, "png"), "txt": text})
        sink.write({"__key__": "broken", "png": b"not a png", "txt": "a broken image"})
    encode(["--dvae", str(d / "dvae"), "--data", str(images), "--out", str(tmp_path / "tokens"), "--num_workers", "2"])
    record = json.loads((tmp_path / "tokens/progress/000003.json").read_text())
    meta = json.loads((tmp_path / "tokens/meta.json").read_text())
    assert record["num_samples"] == 1 and sum(record["skipped"].values()) == 1
    assert meta["num_samples"] == 26 and meta["skipped"] == record["skipped"]
