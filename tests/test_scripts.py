"""End-to-end smoke run of every script on a handful of images, and the 2-process launch."""

import json
import sys
from pathlib import Path

import numpy as np
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
    (d / "prompts.txt").write_text("a photo of a cat\n\n")
    run_script("sample/generate.py", "--dalle", str(d / "dalle/export"), "--clip", str(d / "clip/export"),
               "--synthetic_prompts", "2", "--prompts_file", str(d / "prompts.txt"), "--num_candidates", "4",
               "--top_k_rerank", "2", "--out", str(d / "samples"))
    report = json.loads((d / "samples/scores.json").read_text())
    assert report["summary"]["num_prompts"] == 3 and len(report["prompts"]) == 3
    for p in report["prompts"]:
        assert len(p["clip_cosine"]) == 4 and len(p["top"]) == 2 and p["seed"] == 0
        assert p["clip_score"] == [round(100 * max(c, 0), 3) for c in p["clip_cosine"]]
        assert p["order"][:2] == p["top"] and sorted(p["order"]) == [0, 1, 2, 3]
        assert [p["clip_cosine"][i] for i in p["order"]] == sorted(p["clip_cosine"], reverse=True)
    assert "check" not in report["prompts"][0] and len(report["prompts"][1]["check"]) == 4  # the cat (from the file) is not checkable
    assert 0.0 <= report["summary"]["caption_accuracy_reranked"] <= 1.0
    assert {"caption_accuracy_all", "seconds_per_image", "device"} <= set(report["summary"])
    # generator and reranker judged apart: per candidate, oracle, top-1 under each ranking, per attribute
    caption = report["summary"]["caption"]
    assert set(caption["top1"]) == {"clip", "likelihood", "sampling"} and caption["prompts"] == 2
    assert caption["top1"]["clip"] == report["summary"]["caption_accuracy_top1"]
    assert caption["per_candidate"] == report["summary"]["caption_accuracy_all"] <= caption["oracle"]
    assert {"colour", "shape", "size", "count"} <= set(caption["attributes"]) and caption["by_objects"]
    for p in report["prompts"][1:]:
        assert len(p["likelihood"]) == 4 and [all(a.values()) for a in p["attributes"]] == p["check"]
    assert report["settings"]["backend"] == "ar" and report["settings"]["cond_scale"] == 1.0
    assert (d / "samples/grid.png").stat().st_size > 0 and (d / "samples/candidates.png").exists()
    for i in range(3):
        assert {f.name for f in (d / f"samples/prompts/{i:03d}").iterdir()} == {"grid.png", "rank_00.png", "rank_01.png"}


def test_generate_grid_prompts_shows_the_first_prompts_and_scores_every_one(pipeline):
    from PIL import Image

    d = pipeline
    common = ["sample/generate.py", "--dalle", str(d / "dalle/export"), "--synthetic_prompts", "3", "--num_candidates",
              "2", "--top_k_rerank", "1"]
    run_script(*common, "--out", str(d / "all"))
    run_script(*common, "--grid_prompts", "1", "--out", str(d / "first"))
    height = lambda name, run: Image.open(d / run / name).size[1]
    for name in ("grid.png", "candidates.png"):
        assert height(name, "first") * 2 < height(name, "all")  # one row of three
    scores = lambda run: json.loads((d / run / "scores.json").read_text())["prompts"]
    assert len(scores("first")) == 3 and scores("first") == scores("all")


def test_generate_guided_primed_and_ranked_by_likelihood(pipeline):
    """--cond-scale, --prime-image/--prime-rows and --rank-by likelihood together; the prime's top rows survive."""
    from PIL import Image

    from dalle_ar.data import synthetic

    d = pipeline
    image, _ = synthetic.make_example(0, seed=99)
    image.save(d / "prime.png")
    out = d / "primed"
    run_script("sample/generate.py", "--dalle", str(d / "dalle/export"), "--prompt", "a large red circle on the left",
               "--num-candidates", "3", "--top-k-rerank", "3", "--cond-scale", "2", "--prime-image", str(d / "prime.png"),
               "--prime-rows", "4", "--rank-by", "likelihood", "--seed", "3", "--out", str(out))
    report = json.loads((out / "scores.json").read_text())
    row = report["prompts"][0]
    assert report["summary"]["rank_by"] == "likelihood" and report["settings"]["prime_rows"] == 4
    assert len(row["likelihood"]) == 3 and all(x < 0 for x in row["likelihood"]) and "clip_cosine" not in row
    assert [row["likelihood"][i] for i in row["order"]] == sorted(row["likelihood"], reverse=True)
    # the top 4 code rows are the prime's: the first pixel rows (inside the decoder's reach of them) agree
    tops = [np.asarray(Image.open(out / f"prompts/000/rank_{r:02d}.png"))[:10] for r in range(3)]
    assert all(np.array_equal(tops[0], t) for t in tops[1:])


@pytest.mark.parametrize("flags,message", [
    (["--prime-image", "missing.png", "--prime-rows", "2"], "missing.png: prime/inpaint image not found"),
    (["--prime-image", "{prime}", "--prime-rows", "9"], "prime rows 9 outside the 8x8 code grid"),
    (["--clip-model", "ViT-B-32", "--clip-checkpoint", "nowhere.pt"], "nowhere.pt: CLIP checkpoint not found"),
    (["--clip-model", "NoSuchNet", "--clip-checkpoint", "{prime}"], "unknown open_clip architecture 'NoSuchNet'"),
    (["--inpaint-border", "2"], "--inpaint-border needs an input image"),
])
def test_generate_bad_inputs_are_one_line_errors(pipeline, flags, message):
    import subprocess

    from conftest import script_env

    d = pipeline
    if not (d / "prime.png").exists():
        from dalle_ar.data import synthetic
        synthetic.make_example(0, seed=99)[0].save(d / "prime.png")
    flags = [f.format(prime=d / "prime.png") for f in flags]
    proc = subprocess.run([sys.executable, "sample/generate.py", "--dalle", str(d / "dalle/export"), "--prompt", "x",
                           "--num-candidates", "2", "--top-k-rerank", "1", "--out", str(d / "bad_samples"), *flags],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr[-1000:]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_train_dalle_with_two_processes(pipeline, launcher):
    from dalle_ar.engine import free_port

    d, port = pipeline, str(free_port())
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
    from dalle_ar.metrics import run_info

    assert run_info(out / "export")["world_size"] == 2  # so that its training FLOPs count both ranks


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


def make_plan(target: str, *variables: str, env: dict | None = None) -> list[str]:
    """The commands `make <target>` would run with these make variables (and environment),
    one per line (make -n: nothing runs).
    Skips the test without make or the project's .venv."""
    import shutil
    import subprocess

    if shutil.which("make") is None or not (ROOT / ".venv" / ".installed").exists():
        pytest.skip("needs make and the project's .venv (what `make test` sets up)")
    return subprocess.run(["make", "-n", target, *variables], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout.replace("\\\n", "").splitlines()


def test_make_setup_installs_with_uv_from_the_package_indexes_pip_is_configured_with(tmp_path):
    """uv does not read pip's configuration: `make setup` passes pip's indexes, wheel folders and no-index on as flags,
    from pip's config files and PIP_* variables alike, and none when pip has none."""
    import os

    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url =\n    file:///a/simple\n    file:///b/simple\n"  # one per line, as pip's docs show
                    "[install]\nfind-links = /some/wheels /more/wheels\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}

    def uv_commands(**pip_env):
        lines = make_plan("setup", f"VENV={tmp_path / 'venv'}", env={**env, **pip_env})
        uv = [line.strip() for line in lines if "/bin/uv pip install" in line]
        # the cache on the venv's file system, no home directory needed
        cache = f"UV_CACHE_DIR={tmp_path / 'venv'}/.uv-cache {tmp_path / 'venv'}/bin/uv pip install "
        assert uv and all(cache in line for line in uv)
        return [line.split(" pip install ", 1)[1] for line in uv]

    torch, project = uv_commands(PIP_CONFIG_FILE=str(conf), PIP_EXTRA_INDEX_URL="file:///c/simple")
    for command in (torch, project):
        assert "-c constraints.txt --index-strategy unsafe-best-match" in command
        for flags in ("--index-url https://mirror.example/simple",
                      "--extra-index-url file:///a/simple --extra-index-url file:///b/simple",
                      "--find-links /some/wheels --find-links /more/wheels", "--extra-index-url file:///c/simple"):
            assert flags in command
    assert torch.endswith(" torch==2.14.1 torchvision==0.29.1 pip") and "-e ." in project

    for command in uv_commands(PIP_CONFIG_FILE=os.devnull):  # no config file read, no PIP_* variable: PyPI alone
        assert "--index-url" not in command and "--find-links" not in command and "--no-index" not in command
    for command in uv_commands(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="yes", PIP_FIND_LINKS="/offline/wheels"):
        assert "--no-index --find-links /offline/wheels " in command or "--find-links /offline/wheels --no-index" in command
    for command in uv_commands(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="false"):
        assert "--no-index" not in command


def test_make_demo_passes_its_optimizers_to_the_dvae_and_the_transformer_and_refuses_others(tmp_path):
    import subprocess

    def plan(*args):
        """make demo's commands for these make variables."""
        return make_plan("demo", f"DEMO={tmp_path / 'plan'}", *args)

    def commands(*args):
        """make demo's shards, dVAE and transformer commands for these make variables."""
        lines = plan(*args)
        return [next(line for line in lines if script in line and flag in line)
                for script, flag in (("train/make_shards.py", "--num"), ("train/train_dvae.py", "--steps"),
                                     ("train/train_dalle.py", "--steps"))]

    lines = plan()
    clip = next(line for line in lines if "train/train_clip.py" in line)
    assert "--hard_negatives 2 --context_length 16" in clip  # two wrong captions per caption, 16 caption tokens

    def value(script, flag, *args):
        """The value `flag` takes in make demo's command running `script`, for these make variables."""
        return next(line for line in plan(*args) if script in line).split(f"{flag} ")[1].split()[0]

    def clip_steps(*args):
        return value("train_clip.py", "--steps", *args)

    # the CLIP's steps: 350 with Muon (the default), 400 with AdamW (as its recipe was measured), or as given
    assert (clip_steps(), clip_steps("OPTIMIZER=adamw"), clip_steps("CLIP_STEPS=300")) == ("350", "400", "300")
    encode = next(line for line in lines if "train/encode.py" in line)
    assert encode.endswith("--batch_size 64 --num_workers 1")
    # the transformer's tokenizer trains in the concurrent part (on the first core free), before the transformer
    group = next(i for i, line in enumerate(lines) if "-j2 demo-clip" in line)
    tokenizer = next(i for i, line in enumerate(lines) if "train/train_tokenizer.py" in line)
    transformer = next(i for i, line in enumerate(lines) if "train/train_dalle.py" in line)
    assert "demo-tokenizer" in lines[group] and group < tokenizer < transformer
    # one sampling run: 64 held-out prompts scored, the grid of the first 8 copied to the demo's top level
    runs = [line for line in lines if "sample/generate.py" in line]
    assert len(runs) == 1 and "--synthetic_prompts 64" in runs[0] and runs[0].endswith("--grid_prompts 8")

    def temperature(*args):
        return value("sample/generate.py", "--temperature", *args)

    # the eval's sampling temperature: 0.35 for the Muon transformer (the default), 0.7 for AdamW's, or as given
    assert (temperature(), temperature("OPTIMIZER=adamw"), temperature("DALLE_OPTIMIZER=adamw"),
            temperature("DVAE_OPTIMIZER=adamw"), temperature("DEMO_TEMPERATURE=1.0")) == ("0.35", "0.7", "0.7", "0.35", "1.0")

    for default in ((), ("OPTIMIZER=muon",)):  # Muon is the default: 20,000 images, 2,500 dVAE and 575 transformer steps
        shards, dvae, dalle = commands(*default)
        assert "--num 20000" in shards and "--steps 2500" in dvae and "--steps 575" in dalle
        assert dvae.endswith("--optimizer muon --zero_stage 0 --grad_clip 0 --muon_lr 0.02")
        assert dalle.endswith("--optimizer muon --grad_clip 0 --no-muon_compile --muon_lr 0.01 --muon_momentum 0.95")
    shards, dvae, dalle = commands("OPTIMIZER=adamw")  # the AdamW recipe: 8,000 images, 4,500 and 1,600 steps
    assert "--num 8000" in shards and "--steps 4500" in dvae and "--steps 1600" in dalle
    assert dvae.endswith("--optimizer adamw") and "--zero_stage" not in dvae
    assert dalle.endswith("--optimizer adamw") and "--grad_clip" not in dalle
    shards, dvae, dalle = commands("DVAE_OPTIMIZER=adamw", "DALLE_STEPS=1600")  # one of the two; steps as given
    assert dvae.endswith("--optimizer adamw") and "--steps 1600" in dalle
    assert dalle.endswith("--muon_lr 0.01 --muon_momentum 0.95")
    for var in ("DALLE_OPTIMIZER", "DVAE_OPTIMIZER"):
        bad = subprocess.run(["make", "demo", f"DEMO={tmp_path / 'bad'}", f"{var}=sgd"], cwd=ROOT,
                             capture_output=True, text=True)
        assert bad.returncode != 0 and f"{var}=sgd: use adamw or muon" in bad.stdout + bad.stderr
        assert not (tmp_path / "bad").exists()  # stopped before anything was made


def test_make_comparisons_train_each_backend_with_its_optimizer(tmp_path):
    """compare-matched and compare-scaling pass the demo transformer's optimizer flags to train_matched.py's
    transformer, and the decoder's (with the caption) to its unCLIP decoder, as compare-models (make compare) passes
    them to its own decoder: Muon by default, AdamW with OPTIMIZER=adamw (the recipe docs/compare/scaling_adamw was
    made with); DECODER_OPTIMIZER sets the decoder's alone, DECODER_MUON_LR its Muon lr. compare-scaling's AR samples at
    the demo eval's temperature."""
    import shlex

    demo = tmp_path / "demo"  # a demo that looks done, so that make -n plans no demo before the comparison
    (demo / "data" / "tokens").mkdir(parents=True)
    (demo / "runs" / "dalle" / "export").mkdir(parents=True)
    (demo / "data" / "tokens" / "meta.json").write_text("{}")

    def comparison_argv(target, *args):
        """The comparison script's arguments in make `target`'s plan, for these make variables."""
        lines = make_plan(target, f"DEMO={demo}", f"COMPARE={tmp_path / 'c'}", f"MATCHED={tmp_path / 'm'}",
                          f"SCALING={tmp_path / 's'}", *args)
        script = {"compare-matched": "train/train_matched.py", "compare-scaling": "train/compare_scaling.py"}[target]
        return shlex.split(next(line for line in lines if script in line))

    def stage_args(target, *args):
        argv = comparison_argv(target, *args)
        return {stage: [a.split("=", 1)[1] for a in argv if a.startswith(f"--{stage}-args=")]
                for stage in ("transformer", "prior", "decoder")}

    def ar_temperature(*args):
        argv = comparison_argv("compare-scaling", *args)
        return argv[argv.index("--ar-temperature") + 1]

    # compare-scaling's AR samples at the demo's temperature: 0.35 for the Muon transformer, 0.7 for AdamW's
    assert (ar_temperature(), ar_temperature("OPTIMIZER=adamw"), ar_temperature("DEMO_TEMPERATURE=0.5")) == \
        ("0.35", "0.7", "0.5")

    muon = "--optimizer muon --grad_clip 0 --no-muon_compile --muon_lr 0.01 --muon_momentum 0.95"
    decoder_muon = "--use_caption --optimizer muon --zero_stage 0 --grad_clip 0 --muon_lr 0.01"
    for target in ("compare-matched", "compare-scaling"):
        assert stage_args(target) == {"transformer": [muon], "prior": [], "decoder": [decoder_muon]}
        # the decoder's lr before (docs/compare/scaling's)
        assert stage_args(target, "DECODER_MUON_LR=0.02")["decoder"] == [decoder_muon.replace("0.01", "0.02")]
        assert stage_args(target, "OPTIMIZER=adamw") == {"transformer": ["--optimizer adamw"], "prior": [],
                                                         "decoder": ["--use_caption --optimizer adamw"]}
        assert stage_args(target, "DECODER_OPTIMIZER=adamw")["decoder"] == ["--use_caption --optimizer adamw"]
        # any other name reaches the decoder's trainer, which refuses it, instead of training AdamW in its place
        assert stage_args(target, "DECODER_OPTIMIZER=sgd")["decoder"] == ["--use_caption --optimizer sgd"]

    # make compare's own decoder (compare-models) reads the caption and trains with the same optimizer flags
    def compare_models_decoder(*args):
        lines = make_plan("compare-models", f"DEMO={demo}", f"COMPARE={tmp_path / 'c'}", *args)
        argv = shlex.split(next(line for line in lines if "train/train_decoder.py" in line))
        return " ".join(argv[argv.index("--use_caption"):])

    caption = f"--use_caption --tokenizer {demo}/runs/tokenizer"
    assert compare_models_decoder() == decoder_muon.replace("--use_caption", caption)
    assert compare_models_decoder("OPTIMIZER=adamw") == f"{caption} --optimizer adamw"
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()  # make -n: nothing ran


def test_make_comparisons_train_the_evaluator_clip_only_when_it_is_missing(tmp_path):
    """compare-models, compare-matched and compare-scaling share $(COMPARE)'s evaluator CLIP: each trains it (15 min
    on the 2-core CPU) only behind a test for its export, so a second comparison reuses the first one's."""
    demo = tmp_path / "demo"
    for d in ("runs/dalle/export", "data/tokens"):
        (demo / d).mkdir(parents=True)
    (demo / "data" / "tokens" / "meta.json").write_text("{}")
    compare = tmp_path / "c"
    for target in ("compare-models", "compare-matched", "compare-scaling"):
        lines = make_plan(target, f"DEMO={demo}", f"COMPARE={compare}", f"MATCHED={tmp_path / 'm'}",
                          f"SCALING={tmp_path / 's'}")
        trains = [line.strip() for line in lines if "train/train_clip.py" in line]
        assert len(trains) == 1 and trains[0].startswith(f"test -d {compare}/runs/eval_clip/export || "), (target, trains)
