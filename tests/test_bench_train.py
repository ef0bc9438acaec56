"""The training benchmarks run end to end through the real engine and print their JSON: throughput, and the transformer
recipes scored as generators; the sampling sweep through the real sampler."""

import fcntl
import json
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, tiny_exports


def test_train_throughput_prints_json_with_the_flop_convention(tmp_path):
    out = tmp_path / "tt.json"
    proc = run_script("-m", "bench.train_throughput", "--preset", "tiny", "--variants", "sdpa", "--steps", "1",
                      "--warmup", "1", "--batch_size", "2", "--profile_steps", "1", "--out", str(out))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"].startswith("cpu") and "6N + 12*L*d*seq" in result["flop_convention"]
    (v,) = result["variants"]
    assert "error" not in v, v
    assert v["tokens_per_s"] > 0 and v["model_tflops"] > 0 and v["params_non_embedding"] > 0
    # the 6N + 12*L*d*seq convention and FlopCounterMode over a real step agree within 20% here
    step_tflop = v["model_flop_per_token"] * 2 * (v["config"]["text_len"] + v["config"]["image_fmap_size"] ** 2) / 1e12
    assert abs(v["counted_tflop_per_step"] - step_tflop) < 0.2 * step_tflop
    # one more step under the profiler, through the engine: where its time goes
    assert v["profile"]["calls"] == 1 and v["profile"]["seconds_per_call_by_kind"]["gemm"] > 0, v["profile"]


def test_newton_schulz_times_both_methods_over_the_presets_hidden_matrices(tmp_path):
    out = tmp_path / "ns.json"
    proc = run_script("-m", "bench.newton_schulz", "--preset", "tiny", "--seconds", "0", "--out", str(out))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"].startswith("cpu") and result["matrices"] == 16  # 4 blocks x (qkv, out, fc, proj)
    assert sorted(map(tuple, result["shapes"])) == [(256, 256), (256, 1024), (768, 256), (1024, 256)]
    assert all(t > 0 for t in result["seconds_per_step"].values())
    assert result["max_relative_difference"] < 1e-4  # the same result, to fp32 rounding


def test_transformer_recipes_trains_each_recipe_and_scores_its_candidates(tmp_path, capsys):
    """bench/transformer_recipes.py: each recipe through the real trainer (its flags reach the run), each sampled on
    held-out prompts and checked from pixels; two at once; a rerun scores the finished runs without training again."""
    from bench.transformer_recipes import main as recipes
    from dalle_ar.data import synthetic, write

    m = tiny_exports(tmp_path / "m")
    write.write_image_shards(((f"{i:09d}", *synthetic.make_example(i, image_size=32)) for i in range(24)),
                             tmp_path / "images", samples_per_shard=12)
    runpy.run_path(str(ROOT / "train/encode.py"))["main"](
        ["--dvae", str(m["dvae"]), "--data", str(tmp_path / "images"), "--out", str(tmp_path / "tokens"), "--num_workers", "0"])
    argv = ["--tokens", str(tmp_path / "tokens"), "--tokenizer", str(m["dir"] / "tokenizer.json"), "--steps", "3",
            "--common", "--batch_size 4 --warmup_steps 1 --dim 32 --depth 1 --heads 2 --seed 0 "
            "--image_fmap_size 16 --num_image_tokens 32",
            "--recipe", "lr 1e-3=--lr 1e-3", "--recipe", "lr 5e-3=--lr 5e-3", "--prompts", "2", "--candidates", "2",
            "--jobs", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")]
    r = recipes(argv)
    assert r == json.loads((tmp_path / "r.json").read_text()) and r["threads_per_job"] >= 1
    assert list(r["recipes"]) == ["lr 1e-3", "lr 5e-3"]
    for name, lr, flags in (("lr 1e-3", 1e-3, "--lr 1e-3"), ("lr 5e-3", 5e-3, "--lr 5e-3")):
        row, run = r["recipes"][name], tmp_path / "work" / name.replace(" ", "_")
        assert json.loads((run / "train_config.json").read_text())["lr"] == lr and row["flags"] == flags
        assert 0 <= row["per_candidate"] <= row["oracle"] <= 1 and {"top1.likelihood", "top1.sampling"} <= set(row)
        assert {"train_s", "eval_s"} <= set(row) and row["last_loss"] > 0
        assert any(k.startswith("by_objects.") and k.endswith(".per_candidate") for k in row)
    export = tmp_path / "work" / "lr_1e-3" / "export" / "model.safetensors"
    before = export.stat().st_mtime_ns
    again = recipes(argv)  # nothing retrained, the same figures (the machine's GFLOP/s are read again)
    assert again["recipes"] == r["recipes"] and export.stat().st_mtime_ns == before
    capsys.readouterr()
    with pytest.raises(SystemExit):
        recipes([*argv[:4], "--recipe", "no flags here"])
    assert "write NAME=FLAGS" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"recipe 'bad': train/train_dalle.py failed \(exit 2\): .*--no_such_flag.*\n"
                                         r"whole output: .*bad.train.log"):
        recipes([*argv[:4], "--recipe", "bad=--no_such_flag 1", "--work", str(tmp_path / "work")])


def test_sampling_sweep_samples_each_run_at_each_temperature_on_each_prompt_set(tmp_path, capsys):
    """bench/sampling_sweep.py: demo runs sampled again through sample/generate.py, with each run's own eval seed,
    per temperature and prompt set; the spread over runs; a rerun reads the samples already written."""
    from bench.sampling_sweep import main as sweep

    m = tiny_exports(tmp_path / "m")
    runs = []
    for seed in (0, 3):
        run = tmp_path / f"demo_seed{seed}"
        (run / "runs").mkdir(parents=True)
        (run / "eval").mkdir()
        for name in ("dalle", "clip"):
            (run / "runs" / name).symlink_to(m[name].parent)
        (run / "eval" / "scores.json").write_text(json.dumps({"settings": {"seed": seed}}))
        runs.append(str(run))
    argv = [*runs, "--temperatures", "0.5,1.0", "--sets", "dev,heldout", "--prompts", "2", "--candidates", "2",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.json")]
    r = sweep(argv)
    assert r == json.loads((tmp_path / "r.json").read_text()) and r["seeds"] == {runs[0]: 0, runs[1]: 3}
    assert list(r["sets"]) == ["dev", "heldout"] and r["world_seeds"]["heldout"] != r["world_seeds"]["dev"]
    for name, temps in r["sets"].items():
        assert list(temps) == ["t=0.5", "t=1.0"]
        for t, part in temps.items():
            scores = json.loads((tmp_path / "work" / name / "demo_seed3" / t.replace("=", "") / "scores.json").read_text())
            assert scores["settings"]["temperature"] == float(t[2:]) and scores["settings"]["seed"] == 3
            assert scores["settings"]["num_candidates"] == 2 and len(scores["prompts"]) == 2
            for row in part["per_run"].values():
                assert 0 <= row["per_candidate"] <= row["oracle"] <= 1 and "rerank_efficiency.clip" in row
            values = [row["top1.clip"] for row in part["per_run"].values()]
            assert part["spread"]["top1.clip"]["mean"] == pytest.approx(sum(values) / 2, abs=1e-4)
    dev, held = (json.loads((tmp_path / "work" / s / "demo_seed0" / "t0.5" / "scores.json").read_text()) for s in r["sets"])
    assert dev["prompts"][0]["prompt"] != held["prompts"][0]["prompt"]  # two prompt sets
    assert "| dev | t=0.5 |" in r["table"]
    written = tmp_path / "work" / "dev" / "demo_seed0" / "t0.5" / "scores.json"
    before = written.stat().st_mtime_ns
    assert sweep(argv)["sets"] == r["sets"] and written.stat().st_mtime_ns == before  # nothing sampled again
    capsys.readouterr()
    twin = tmp_path / "clone" / "demo_seed0"
    twin.parent.mkdir()
    twin.symlink_to(runs[1], target_is_directory=True)
    for bad, message in (([*runs, "--temperatures", "0"], "must be above 0"), ([*runs, "--sets", "train"], "unknown"),
                         ([str(tmp_path)], "no runs/dalle/export"),
                         # two runs of one name (outputs/demo of two clones) would read each other's samples in --work
                         ([runs[0], str(twin)], "both are named 'demo_seed0'")):
        with pytest.raises(SystemExit):
            sweep(bad)
        assert message in capsys.readouterr().err


def test_stage_log_waits_for_a_concurrent_append_and_loses_none(tmp_path):
    """`make demo` runs two stages at once; each appends to stages.json under a lock, so none overwrites the other."""
    log = tmp_path / "stages.json"
    stage = [sys.executable, "-m", "bench.stage", "--log", str(log)]
    subprocess.run(stage + ["--name", "first", "--", sys.executable, "-c", "pass"], cwd=ROOT, check=True)
    with open(tmp_path / "stages.json.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another stage is mid-append
        proc = subprocess.Popen(stage + ["--name", "second", "--", sys.executable, "-c", "raise SystemExit(3)"], cwd=ROOT)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=5)  # it ran its command and now waits for the lock, not writing
        assert [s["name"] for s in json.loads(log.read_text())] == ["first"]
    assert proc.wait(timeout=60) == 3  # the command's own status
    stages = json.loads(log.read_text())
    assert [(s["name"], s["status"]) for s in stages] == [("first", 0), ("second", 3)]


def test_sample_speed_reports_each_batch_against_the_bandwidth_floor(tmp_path):
    """bench/sample_speed.py: seconds per image for each batch size through the real sampler, each set beside its
    bandwidth floor; the JSON on disk is complete only at the end (a cut-off run keeps the batches it timed)."""
    out = tmp_path / "ss.json"
    proc = run_script("-m", "bench.sample_speed", "--preset", "tiny", "--batch-sizes", "1,2", "--repeats", "1",
                      "--bandwidth-bytes", str(2 ** 20), "--profile-tokens", "4", "--out", str(out))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text()) and result["complete"] is True
    assert result["device"].startswith("cpu") and result["dtype"] == "float32"
    rows = result["results"]["eager"]
    assert set(rows) == {"1", "2"}
    for b, r in rows.items():
        assert r["seconds_per_image"] == pytest.approx(r["seconds_per_batch"] / int(b), rel=1e-2, abs=1e-4)
        assert r["first_call_seconds"] > 0  # the warm-up call (compilation too, when compiled), timed apart
        # the floor comes from a bandwidth measured on a machine that may be busy: only its bookkeeping is tested here
        assert r["floor_seconds_per_image"] > 0
        assert r["x_floor"] == pytest.approx(r["seconds_per_image"] / r["floor_seconds_per_image"], rel=0.02, abs=0.01)
        prof = r["profile_per_token"]  # 4 decode steps from mid-grid, by kind of work (CPU: operator self time)
        assert "error" not in prof, prof
        assert prof["calls"] == 4 and prof["launches_per_call"] is None  # no CUDA launches to count on CPU
        kinds = prof["seconds_per_call_by_kind"]
        assert kinds["gemm"] > 0 and kinds["attention"] > 0 and "optimizer" not in kinds
        assert 0 < prof["busy_seconds_per_call"] <= prof["wall_seconds_per_call"]


def test_profile_summary_groups_device_time_by_kind_and_counts_launches_per_call():
    """bench/profiling.summarize on CUDA-shaped events: kernel time by kind, host launches and graph replays per call,
    CPU operators (which on CUDA only launch) not counted as busy time."""
    from types import SimpleNamespace

    import torch

    from bench.profiling import kind_of, summarize

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, device, us):
        return SimpleNamespace(name=name, device_type=device, self_cpu_time_total=us if device == cpu else 0,
                               self_device_time_total=us if device == cuda else 0)

    events = [ev("sm90_xmma_gemm_bf16bf16_bf16f32", cuda, 600), ev("flash_fwd_kernel", cuda, 200),
              ev("triton_poi_fused_add_0", cuda, 100), ev("multi_tensor_apply_kernel", cuda, 50),
              ev("Memcpy DtoD (Device -> Device)", cuda, 50), ev("aten::mm", cpu, 5000),
              *[ev("cudaLaunchKernel", cpu, 5)] * 6, *[ev("cudaGraphLaunch", cpu, 5)] * 2]
    s = summarize(events, wall_s=0.002, calls=2, cuda=True)
    assert s["seconds_per_call_by_kind"] == {"gemm": 0.0003, "attention": 0.0001, "other": 5e-05, "optimizer": 2.5e-05,
                                             "copy/comm": 2.5e-05}
    assert s["busy_seconds_per_call"] == 0.0005 and s["busy_share"] == 0.5
    assert s["launches_per_call"] == {"kernel": 3, "graph": 1}
    assert [kind_of(n) for n in ("aten::addmm", "aten::_scaled_dot_product_flash_attention", "aten::native_layer_norm",
                                 "aten::_fused_adamw_", "aten::relu")] == ["gemm", "attention", "norm", "optimizer", "other"]


def test_rerank_accuracy_ranks_the_same_candidates_by_each_clip_and_by_contrast(tmp_path, capsys):
    """bench/rerank_accuracy.py: one set of candidates, ranked by two CLIPs, by each as a classifier over the caption
    and its one-attribute variants (--contrast), and by likelihood; no top-1 above the oracle."""
    import torch

    from bench.rerank_accuracy import main as rerank_accuracy
    from dalle_ar.clip import ClipScorer
    from dalle_ar.data import synthetic

    m = tiny_exports(tmp_path / "m")
    r = rerank_accuracy(["--dalle", str(m["dalle"]), "--clip", str(m["clip"]), "--clip", str(m["eval_clip"]),
                         "--prompts", "3", "--candidates", "4", "--top-of", "4", "--cond-scales", "1", "--contrast",
                         "--out", str(tmp_path / "r.json")])
    assert r == json.loads((tmp_path / "r.json").read_text()) and r["contrast"] is True
    row = r["results"]["cond_scale=1"]
    rankings = ("clip0", "clip1", "clip0_contrast", "clip1_contrast", "likelihood")
    assert set(row) == {"no_rerank", "oracle", *(f"{n}_top1_of_4" for n in rankings)}
    for n in rankings:
        assert 0 <= row[f"{n}_top1_of_4"] <= row["oracle"] <= 1
    assert "clip0 contrast top1 of 4" in r["table"]
    # the contrast ranking is the CLIP's log-probability of the caption among its variants
    prompt = synthetic.make_example(0, seed=synthetic.HELDOUT_SEED)[1]
    scorer = ClipScorer.load(str(m["clip"]))
    image = torch.rand(2, 3, 32, 32)
    variants = [c for _, c in synthetic.variants(prompt)]
    logits = scorer.model.logit_scale.exp() * scorer.scores(image, [prompt, *variants])
    assert torch.allclose(scorer.caption_logprob(image, prompt, variants), logits.log_softmax(1)[:, 0], atol=1e-5)
    capsys.readouterr()
