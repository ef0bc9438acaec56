"""Habits of people who already train DALL-E: --init_from an export, sample previews during training, the `dalle-ar`
command, scripts run from any directory, an explicit preset."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_script, script_env
from safetensors.torch import load_file

from dalle_ar.config import ConfigError

QUIET = ["--save_every", "0", "--log_every", "1", "--no-progress", "--wandb", "disabled", "--zero_stage", "0"]


def dalle_args(token_data, out, *extra):
    return ["--data", str(token_data / "tokens"), "--tokenizer", str(token_data / "tok"), "--out", str(out),
            "--batch_size", "4", "--warmup_steps", "1", *QUIET, *extra]


@pytest.fixture(scope="module")
def first_run(token_data, tmp_path_factory):
    """Two steps of a small transformer, exported."""
    out = tmp_path_factory.mktemp("first") / "dalle"
    run_script("train/train_dalle.py", *dalle_args(token_data, out, "--dim", "32", "--depth", "1", "--heads", "2",
                                                   "--steps", "2"))
    return out


def test_init_from_starts_a_new_run_from_the_exports_weights(token_data, first_run, tmp_path):
    """Weights from the export, the model config from its config.json (no --dim given), and a fresh optimizer: with
    lr 0 the first step leaves the weights as they came, and the optimizer has taken one step, not three."""
    out = tmp_path / "second"
    proc = run_script("train/train_dalle.py", *dalle_args(token_data, out, "--init_from", str(first_run / "export"),
                                                          "--steps", "1", "--lr", "0"))
    assert "optimizer, LR schedule and step start at 0" in proc.stdout
    old, new = load_file(first_run / "export/model.safetensors"), load_file(out / "export/model.safetensors")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert json.loads((out / "export/config.json").read_text())["model"]["dim"] == 32
    state = torch.load(out / "checkpoints/step_00000001/mp_rank_00_model_states.pt", weights_only=False)
    assert {s["step"].item() if torch.is_tensor(s["step"]) else s["step"]
            for s in state["optimizer"]["state"].values()} == {1}
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_init_from_a_model_of_another_shape_names_the_parameter_and_the_fix(token_data, first_run, tmp_path):
    sys.path.insert(0, str(ROOT / "train"))
    from train_dalle import main

    with pytest.raises(ConfigError) as e:
        main(dalle_args(token_data, tmp_path / "wide", "--init_from", str(first_run / "export"), "--dim", "64",
                        "--steps", "1"))
    msg = str(e.value)
    assert "bos is (32,) in the export but (64,) here" in msg  # the first parameter that differs
    assert "use the same --preset/model flags as the export" in msg and "model.dim 32 vs 64" in msg
    assert not (tmp_path / "wide").exists()  # refused before anything was written


def test_init_from_an_export_of_another_kind_is_a_one_line_error(token_data, tmp_path):
    clip = tmp_path / "clip_export"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"kind": "clip", "clip": {"image_size": 64}}))
    proc = subprocess.run([sys.executable, "train/train_dalle.py",
                           *dalle_args(token_data, tmp_path / "run", "--init_from", str(clip), "--steps", "1")],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --init_from") and str(clip) in line
    assert "a clip export" in line and "this trainer trains dalle" in line


def test_paper_sizes_without_a_preset_warn_that_the_tiny_recipe_still_applies(monkeypatch, capsys, tmp_path):
    sys.path.insert(0, str(ROOT / "train"))
    import train_dvae

    class Built(Exception):
        pass

    def trainer(model, cfg, **kw):
        raise Built(model.config)

    monkeypatch.setattr(train_dvae, "Trainer", trainer)
    argv = ["--data", str(tmp_path), "--out", str(tmp_path / "run")]
    with pytest.raises(Built):
        train_dvae.main([*argv, "--image_size", "256", "--num_tokens", "8192"])
    err = capsys.readouterr().err
    assert "warning: --image_size 256 --num_tokens 8192 are the paper's sizes" in err
    assert "n_hid 16" in err and "reconstruction mse" in err and "pass --preset paper" in err
    from dalle_ar.cli import _warn_paper_sizes_with_tiny
    from dalle_ar.config import UnetConfig

    _warn_paper_sizes_with_tiny({UnetConfig: {"use_caption": True}})  # a switch the paper also sets is not a size
    assert "warning" not in capsys.readouterr().err
    _warn_paper_sizes_with_tiny({UnetConfig: {"image_size": 64}})
    assert "warning: --image_size 64 are the paper's sizes" in capsys.readouterr().err
    with pytest.raises(Built) as built:  # the paper's recipe, and no warning, when the preset is named
        train_dvae.main([*argv, "--preset", "paper"])
    assert built.value.args[0].n_hid == 256 and "warning" not in capsys.readouterr().err


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_transformer_previews_sample_held_out_captions_and_leave_training_unchanged(token_data, first_run, tmp_path):
    """--sample_every: a captioned grid per preview through the real sampling path, decoded by --dvae (here an untrained
    one), in <out>/samples and wandb; the losses equal those of the same run without previews (first_run: no dVAE
    anywhere, so previews were off)."""
    from dalle_ar import models
    from dalle_ar.checkpoint import save_pretrained
    from dalle_ar.config import DVAEConfig, preset
    from dvae import DiscreteVAE

    dvae = DiscreteVAE(preset(DVAEConfig, "tiny"))
    save_pretrained(dvae, tmp_path / "dvae", models.export_config("dvae", dvae))
    out = tmp_path / "previews"
    previews = ["--sample_every", "1", "--dvae", str(tmp_path / "dvae"), "--wandb", "offline"]
    run_script("train/train_dalle.py", *dalle_args(token_data, out, "--dim", "32", "--depth", "1", "--heads", "2",
                                                   "--steps", "2", *previews))
    assert losses(out) == losses(first_run)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    assert len(list(out.glob("wandb/offline-run-*/files/media/images/samples_*.png"))) == 2
    assert not (first_run / "samples").exists()


def test_clip_previews_log_retrieval_accuracy_and_a_captioned_grid(shapes_shards, tmp_path):
    out = tmp_path / "clip"  # ZeRO 1: DeepSpeed's stage-0 gradient clipping fails on open_clip's 0-dim logit_scale
    proc = run_script("train/train_clip.py", "--data", str(shapes_shards), "--out", str(out), "--vision_layers", "1",
                      "--text_layers", "1", "--steps", "2", "--batch_size", "8", "--warmup_steps", "1", *QUIET,
                      "--sample_every", "1", "--wandb", "offline", "--zero_stage", "1")
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/retrieval_i2t" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["eval/retrieval_t2i"] <= 1 for r in evals)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["retrieval_00000001.png", "retrieval_00000002.png"]
    assert len(list(out.glob("wandb/offline-run-*/files/media/images/retrieval_*.png"))) == 2
    assert "Traceback" not in proc.stderr


def test_the_packaged_ds_config_is_the_repositorys():
    assert (ROOT / "dalle_ar" / "ds_config.json").read_bytes() == (ROOT / "ds_config.json").read_bytes(), \
        "dalle_ar/ds_config.json is the copy an install ships: cp ds_config.json dalle_ar/ds_config.json"


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("dalle_ar", "dvae")
               for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"


def test_the_dalle_ar_command_in_a_checkout(tmp_path):
    env = {**script_env(), "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "dalle_ar"]
    out = subprocess.run([*run, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120).stdout
    assert "train-dalle" in out and "train/train_dalle.py: Train the DALL-E transformer" in out and "serve" in out
    proc = subprocess.run([*run, "train-dvae", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: dalle-ar train-dvae")
    proc = subprocess.run([*run, "trian-dalle"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown subcommand 'trian-dalle'" in proc.stderr


def test_an_installed_copy_trains_from_any_directory(token_data, tmp_path):
    """A regular (non-editable) install: the `dalle-ar` command runs the scripts it carries, from a directory with no
    ds_config.json (the packaged default is used)."""
    import shutil

    src, target, work = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "outputs",
                                                             ".venv", "wandb", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    assert (target / "dalle_ar/ds_config.json").is_file() and (target / "dalle_ar/_scripts/sample/generate.py").is_file()
    work.mkdir()
    env = {**script_env(), "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import dalle_ar._scripts.train.train_dalle as m; print(m.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120).stdout
    assert where.startswith(str(target / "dalle_ar/_scripts/train/"))  # the installed copy, not this checkout
    proc = subprocess.run([sys.executable, str(target / "bin" / "dalle-ar"), "train-dalle",
                           *dalle_args(token_data, work / "run", "--dim", "32", "--depth", "1", "--heads", "2",
                                       "--steps", "1")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run/export/model.safetensors").is_file() and not (work / "ds_config.json").exists()
    resolved = json.loads((work / "run/ds_config.resolved.json").read_text())
    assert resolved["train_micro_batch_size_per_gpu"] == 4
