"""End-to-end smoke run of every script on a handful of images, and the 2-process launch."""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

FAST = ["--steps", "3", "--batch_size", "8", "--warmup_steps", "1", "--save_every", "0"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    run_script("train/make_shards.py", "synthetic", "--out", str(d / "shapes"), "--num", "64", "--samples_per_shard", "16")
    run_script("train/train_tokenizer.py", "--data", str(d / "shapes"), "--out", str(d / "tok"), "--vocab_size", "300")
    run_script("train/train_dvae.py", "--data", str(d / "shapes"), "--out", str(d / "dvae"), "--n_hid", "8", *FAST)
    run_script("train/encode.py", "--dvae", str(d / "dvae/export"), "--data", str(d / "shapes"), "--out", str(d / "tokens"))
    run_script("train/train_dalle.py", "--data", str(d / "tokens"), "--tokenizer", str(d / "tok"), "--out", str(d / "dalle"),
               "--dim", "32", "--depth", "1", "--heads", "2", *FAST)
    run_script("train/train_clip.py", "--data", str(d / "shapes"), "--out", str(d / "clip"), "--vision_layers", "1",
               "--text_layers", "1", *FAST)
    return d


def test_every_stage_writes_its_outputs(pipeline):
    d = pipeline
    assert json.loads((d / "shapes/stats.json").read_text())["written"] == 64
    assert (d / "tok/tokenizer.json").exists()
    for run in ("dvae", "dalle", "clip"):
        assert (d / run / "export/model.safetensors").exists() and (d / run / "export/config.json").exists()
        assert (d / run / "checkpoints/latest").exists()
        assert list((d / run / "wandb").glob("offline-run-*")), f"{run}: no offline wandb run"
    assert (d / "dvae/reconstructions.png").exists() and (d / "dvae/samples/recon_00000003.png").exists()
    assert {"psnr", "codebook_usage", "perplexity"} <= set(json.loads((d / "dvae/reconstruction.json").read_text()))
    assert json.loads((d / "tokens/meta.json").read_text())["num_samples"] == 64
    assert (d / "dalle/export/tokenizer.json").exists()


def test_generate_writes_grid_and_scores(pipeline):
    d = pipeline
    run_script("sample/generate.py", "--dalle", str(d / "dalle/export"), "--clip", str(d / "clip/export"),
               "--synthetic_prompts", "2", "--prompt", "a photo of a cat", "--num_candidates", "4", "--top_k_rerank", "2",
               "--out", str(d / "samples"))
    report = json.loads((d / "samples/scores.json").read_text())
    assert report["summary"]["num_prompts"] == 3 and len(report["prompts"]) == 3
    assert all(len(p["clip_scores"]) == 4 and len(p["top"]) == 2 for p in report["prompts"])
    assert "check" not in report["prompts"][0] and len(report["prompts"][1]["check"]) == 4  # the cat is not checkable
    assert 0.0 <= report["summary"]["caption_accuracy_reranked"] <= 1.0
    assert (d / "samples/grid.png").stat().st_size > 0 and (d / "samples/candidates.png").exists()


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_train_dalle_with_two_processes(pipeline, launcher):
    from dalle_ar.engine import _free_port

    d, port = pipeline, str(_free_port())
    launch = {"torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port],
              # the deepspeed launcher appends --local_rank=N, which every trainer accepts
              "deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port]}[launcher]
    out = d / f"dalle_{launcher}"
    args = ["train/train_dalle.py", "--data", str(d / "tokens"), "--tokenizer", str(d / "tok"), "--out", str(out),
            "--dim", "32", "--depth", "1", "--heads", "2", "--zero_stage", "2", *FAST]
    if launcher == "torchrun":
        run_script(*launch, *args)
    else:
        import subprocess

        from conftest import script_env

        proc = subprocess.run([*launch, *args], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "export/model.safetensors").exists()
    assert (out / "checkpoints/step_00000003/zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()


def test_dvae_benchmarks_print_json(pipeline, tmp_path):
    d = pipeline
    run_script("-m", "bench.dvae_quality", "--dvae", str(d / "dvae/export"), "--synthetic", "24", "--batch_size", "16",
               "--grid", str(tmp_path / "grid.png"), "--out", str(tmp_path / "q.json"))
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["images"] == 24 and q["device"].startswith("cpu") and (tmp_path / "grid.png").exists()
    assert 0 < q["codebook_usage"] <= 1 and 1 <= q["perplexity"] <= 512 and q["psnr_db"] > 5 and -1 <= q["ssim"] <= 1
    assert q["meets_targets"] == (q["psnr_db"] >= 30 and q["codebook_usage"] >= 0.9)
    run_script("-m", "bench.dvae_speed", "--batch_size", "4", "--repeats", "1", "--variants", "fp32,cl,onehot_decode",
               "--out", str(tmp_path / "s.json"))
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["variants"]) == {"fp32", "cl", "onehot_decode"} and s["variants"]["fp32"]["encode_speedup"] == 1.0


def test_wrong_config_is_a_one_line_error(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    import subprocess

    proc = subprocess.run([sys.executable, "train/train_dvae.py", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "stepz" in proc.stderr and "run.json" in proc.stderr


def test_every_script_documents_its_flags():
    for script in ("train/make_shards.py", "train/train_tokenizer.py", "train/train_dvae.py", "train/encode.py",
                   "train/convert_openai_dvae.py",
                   "train/train_dalle.py", "train/train_clip.py", "sample/generate.py"):
        out = run_script(script, "--help").stdout
        assert "usage:" in out and "--" in out


def test_mismatched_tokens_are_a_one_line_error(pipeline):
    import subprocess

    from conftest import script_env

    d = pipeline
    proc = subprocess.run([sys.executable, "train/train_dalle.py", "--data", str(d / "tokens"), "--tokenizer", str(d / "tok"),
                           "--out", str(d / "bad"), "--num_image_tokens", "1024"], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "meta.json" in last and "--num_image_tokens 512" in last
    assert "Traceback" not in proc.stderr
