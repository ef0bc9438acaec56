"""sample/compare.py builds its report end to end from tiny (untrained) models made here: a DALL-E + dVAE
export, a prior + decoder export, and two different CLIPs; and it refuses an evaluator equal to the rerank CLIP.
train/train_matched.py --train-budget-flops trains tiny models on tiny shards so that each backend's counted training
FLOPs come to the budget, then reports on them with compare.py (the planner, metrics.plan_steps, is checked against
hand-computed values). train/compare_scaling.py runs train_matched.py at two budgets that share one CLIP-embedding
precompute and aggregates the reports; its verdict (dalle_ar.scaling.verdict) is checked on hand-made rows."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, tiny_exports

from dalle_ar import comparison, metrics, scaling
from dalle_ar.config import ConfigError
from dalle_ar.data import embeddings, synthetic, write

script = runpy.run_path(str(ROOT / "sample/compare.py"))
compare = script["main"]
matched = runpy.run_path(str(ROOT / "train/train_matched.py"))
train_matched = matched["main"]
compare_scaling = runpy.run_path(str(ROOT / "train/compare_scaling.py"))["main"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_exports(tmp_path_factory.mktemp("compare"))


def args(m, out, *extra):
    return ["--ar", str(m["dalle"]), "--unclip-prior", str(m["prior"]), "--unclip-decoder", str(m["decoder"]),
            "--clip", str(m["clip"]), "--eval-clip", str(m["eval_clip"]), "--synthetic-prompts", "2",
            "--samples-per-prompt", "2", "--real-images", "8", "--bootstrap", "20", "--timing-images", "1",
            "--no-progress", "--out", str(out), *extra]


def test_report_builds_end_to_end(models, tmp_path):
    out = tmp_path / "report"
    report = compare(args(models, out, "--ar-rerank", "1,2", "--unclip-guidance", "3", "--unclip-steps", "2"))
    saved = json.loads((out / "report.json").read_text())
    assert [r["setting"] for r in saved["settings"]] == ["AR N=1 T=1", "AR N=2 T=1", "unCLIP g=3 steps=2"]
    for r in saved["settings"]:
        assert {"clip_score", "clip_score_ci", "fd", "fd_ci", "kid", "kid_std", "diversity", "diversity_ci",
                "caption_accuracy", "seconds_per_image", "seconds_per_image_batch1", "nfe_calls", "nfe_rows"} <= set(r)
        assert 0 <= r["clip_score"] <= 100 and r["fd"] >= 0 and 0 <= r["caption_accuracy"] <= 1
        lo, hi = r["clip_score_ci"]
        assert lo <= r["clip_score"] <= hi
    ar1, ar2, un = saved["settings"]
    assert ar1["nfe_calls"] == 16 and ar2["nfe_calls"] == 32  # N candidates x 4x4 decode steps per kept image
    # prior unguided (scale 1): 2 candidates x 1 row; decoder at scale 3: 2 guidance rows
    assert un["nfe_calls"] == 2 + 2 and un["nfe_rows"] == 2 * 2 * 1 + 2 * 2
    unguided = {"backend": "unclip", "guidance": 1.0, "steps": 16}
    assert comparison.nfe(unguided, 16, False)["nfe_rows"] == 16 * 2 + 16
    assert comparison.nfe(unguided, 16, True, prior_guidance=2.0)["nfe_rows"] == 16 * 2 * 2 + 16 + 16
    cost = saved["cost"]
    assert set(cost["ar"]["params"]) == {"transformer", "dvae", "total"}
    assert set(cost["unclip"]["params"]) == {"prior", "decoder", "total"}
    for backend in ("ar", "unclip"):
        stages = cost[backend]["training"]
        assert all(s["steps"] == 5 and s["flops"] == 5 * s["flops_per_step"] > 0 for s in stages.values())
        assert cost[backend]["training_flops"] == sum(s["flops"] for s in stages.values())
    # the transformer's run recorded two data-parallel ranks: its steps count twice
    transformer, dvae = cost["ar"]["training"]["transformer"], cost["ar"]["training"]["dvae"]
    assert transformer["world_size"] == 2 and dvae["world_size"] == 1
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ar | transformer |"))
    assert "| 2 x 2 ranks |" in row
    assert saved["real"]["caption_accuracy"] == 1.0  # the world's own renders pass its checker
    objects = {str(len(synthetic.parse_caption(p).shapes)) for p in saved["prompts"]}
    for r in [*saved["settings"], saved["real"]]:  # caption accuracy split by the number of shapes a prompt names
        split = r["caption_accuracy_by_objects"]
        assert set(split) == objects and sum(v["prompts"] for v in split.values()) == 2
        assert sum(v["accuracy"] * v["prompts"] for v in split.values()) / 2 == pytest.approx(r["caption_accuracy"],
                                                                                              abs=1e-3)
    assert all(v["accuracy"] == 1.0 for v in saved["real"]["caption_accuracy_by_objects"].values())
    assert saved["best"]["ar"] in ("AR N=1 T=1", "AR N=2 T=1") and report["best"] == saved["best"]
    md = (out / "report.md").read_text()
    assert "| AR N=2 T=1 |" in md and "## Training cost" in md and "![side by side](side_by_side.png)" in md
    assert all(f"| {n}-obj acc. |" in md for n in objects)
    for png in ("quality_vs_training_flops.png", "quality_vs_seconds.png", "clip_score_vs_diversity.png",
                "accuracy_vs_seconds.png", "side_by_side.png"):
        assert (out / png).stat().st_size > 1000, png


def test_caption_accuracy_by_objects_splits_prompts_by_their_shape_count():
    prompts = ["a large purple triangle at the top", "a large purple circle below a large red square",
               "a large green square on the right", "a large orange square to the left of a small green circle"]
    passed = np.array([[1, 1], [0, 1], [1, 0], [0, 0]], dtype=float)  # (P, K) pixel checks
    split = comparison.accuracy_by_objects(passed, prompts, bootstrap=0, seed=0)
    assert split == {"1": {"accuracy": 0.75, "ci": None, "prompts": 2}, "2": {"accuracy": 0.25, "ci": None, "prompts": 2}}
    lo, hi = comparison.accuracy_by_objects(passed, prompts, bootstrap=50, seed=0)["1"]["ci"]
    assert 0.5 <= lo <= 0.75 <= hi <= 1.0  # over prompts: per-prompt means 1.0 and 0.5


def test_evaluator_equal_to_the_rerank_clip_is_refused(models, tmp_path):
    bad = args(models, tmp_path / "r")
    bad[bad.index("--eval-clip") + 1] = str(models["clip"])
    with pytest.raises(ConfigError, match="--eval-clip .* is the CLIP used for reranking"):
        compare(bad)


# ------------------------------------------------------------------------------------------------
# --train-budget-flops
# ------------------------------------------------------------------------------------------------

def test_plan_gives_the_last_stage_what_is_left():
    # AR: the dVAE's 100 FLOPs count first; transformer steps of 30 FLOPs: floor(900 / 30) = 30, none left
    ar = metrics.plan_steps(1000, {"transformer": 30}, spent={"dvae": 100})
    assert ar["stages"] == {"transformer": {"steps": 30, "flops_per_step": 30, "flops": 900}}
    assert ar["flops"] == 1000 and ar["left"] == 0
    # unCLIP: prior floor(0.25 * 1000 / 7) = 35 steps (245), decoder floor(755 / 40) = 18 steps (720), 35 left < 40
    un = metrics.plan_steps(1000, {"prior": 7, "decoder": 40}, shares={"prior": 0.25})
    assert [(s["steps"], s["flops"]) for s in un["stages"].values()] == [(35, 245), (18, 720)]
    assert un["flops"] == 965 and un["left"] == 35
    # rounding: floor((1000 - 101) / 30) = 29 steps, 29 left over (less than one step)
    assert metrics.plan_steps(1000, {"transformer": 30}, spent={"dvae": 101})["left"] == 29


@pytest.mark.parametrize("kwargs, message", [
    (dict(spent={"dvae": 1200}), r"does not cover dvae 1.2e\+03 \(already trained\).*raise it to at least 1.23e\+03"),
    (dict(spent={"dvae": 990}), r"raise it to at least 1.02e\+03"),  # the dVAE leaves less than one step
])
def test_plan_refuses_a_budget_the_dvae_alone_spends(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.plan_steps(1000, {"transformer": 30}, **kwargs)


def test_plan_refuses_bad_shares():
    with pytest.raises(ValueError, match="less than one prior step"):
        metrics.plan_steps(1000, {"prior": 7, "decoder": 40}, shares={"prior": 0.005})
    with pytest.raises(ValueError, match="less than one decoder step"):
        metrics.plan_steps(1000, {"prior": 7, "decoder": 40}, shares={"prior": 0.99})
    with pytest.raises(ValueError, match="shares must name every stage but the last"):
        metrics.plan_steps(1000, {"prior": 7, "decoder": 40})


@pytest.fixture(scope="module")
def training_data(models):
    """Tiny image shards, their token shards from the fixture's dVAE (train/encode.py)."""
    d = models["dir"] / "train_data"
    write.write_image_shards(((f"{i:09d}", *synthetic.make_example(i, image_size=32)) for i in range(48)),
                              d / "images", samples_per_shard=24)
    runpy.run_path(str(ROOT / "train/encode.py"))["main"](
        ["--dvae", str(models["dvae"]), "--data", str(d / "images"), "--out", str(d / "tokens"), "--num_workers", "0"])
    return {"images": str(d / "images"), "tokens": str(d / "tokens")}


TINY = ["--transformer-args", "--dim 32 --depth 1 --heads 2 --batch_size 4 --warmup_steps 1",
        "--prior-args", "--dim 32 --depth 1 --heads 2 --batch_size 4 --warmup_steps 1 --eval_samples 4 --eval_steps 2",
        "--decoder-args", "--image_size 16 --channels 8 --channel_mult 1,2 --head_channels 8 --batch_size 4 "
                          "--warmup_steps 1 --sample_steps 2 --num_samples 2 --sample_every 0"]
BUDGET = 2e9  # tiny models: the fixture's dVAE run (5 steps) + 5-20 steps of each trained stage


def training_args(m, data, out, *extra):
    """train_matched.py's flags but the budget (and, through it, compare.py's)."""
    return ["--train-images", data["images"], "--train-tokens", data["tokens"], "--tokenizer", str(m["dir"] / "tokenizer.json"),
            "--clip", str(m["clip"]), "--eval-clip", str(m["eval_clip"]), "--budget-prior-share", "0.1", *TINY,
            "--synthetic-prompts", "2", "--samples-per-prompt", "2", "--real-images", "8", "--bootstrap", "10",
            "--timing-images", "1", "--ar-rerank", "1", "--unclip-guidance", "3", "--unclip-steps", "2",
            "--batch-size", "8", "--no-progress", "--out", str(out), *extra]


def budget_args(m, data, out, *extra):
    return ["--train-budget-flops", f"{BUDGET:g}", *training_args(m, data, out, *extra)]


@pytest.fixture(scope="module")
def scaling_run(models, training_data, tmp_path_factory):
    """train/compare_scaling.py at BUDGET and 2 x BUDGET: train_matched.py at each, in <out>/budget_2e9 and
    <out>/budget_4e9, on one CLIP-embedding precompute in <out>/clip_embeddings."""
    out = tmp_path_factory.mktemp("scaling")
    argv = ["--budgets", f"{2 * BUDGET:g},{BUDGET:g}", *training_args(models, training_data, out)]
    return {"out": out, "argv": argv, "result": compare_scaling(argv)}


def test_matched_budget_trains_both_backends_to_the_budget(models, training_data, scaling_run):
    out = scaling_run["out"] / "budget_2e9"  # train_matched.py --train-budget-flops 2e9, run by compare_scaling
    saved = json.loads((out / "report.json").read_text())
    budget, cost = saved["train_budget"], saved["cost"]
    assert budget["budget_flops"] == BUDGET
    for backend, stages in (("ar", ["transformer"]), ("unclip", ["prior", "decoder"])):
        plan, counted = budget[backend], cost[backend]["training"]
        assert list(plan["stages"]) == stages
        for stage, p in plan["stages"].items():  # planned before training == counted on the export afterwards
            assert p["steps"] >= 1 and p["trained_now"]
            assert counted[stage]["steps"] == p["steps"] and counted[stage]["flops_per_step"] == p["flops_per_step"]
        last = plan["stages"][stages[-1]]["flops_per_step"]
        assert 0 <= BUDGET - cost[backend]["training_flops"] < last  # within one step of the budget
        assert budget[backend]["counted_flops"] == cost[backend]["training_flops"]
    assert cost["ar"]["training"]["dvae"]["flops"] == budget["ar"]["spent"]["dvae"] > 0
    prior = budget["unclip"]["stages"]["prior"]
    assert prior["flops"] <= 0.1 * BUDGET < prior["flops"] + prior["flops_per_step"]
    assert saved["models"]["ar"] == str(out / "runs" / "transformer" / "export")
    cores = matched["cores"]()
    assert budget["concurrent_threads"] == (cores // 2 if cores >= 2 else None)
    if budget["concurrent_threads"]:  # the backends trained at once: unCLIP's stages wrote their output to logs
        for stage in ("prior", "decoder"):
            assert f"{stage}:" in (out / "runs" / f"{stage}.log").read_text()
        assert not (out / "runs" / "transformer.log").exists()  # AR's went to the terminal
    md = (out / "report.md").read_text()
    assert "## Matched training budget" in md and "`--train-budget-flops 2e+09`" in md

    # the same command again: every run is finished, so nothing is retrained (only planned and checked)
    shared = ["--embeddings", str(scaling_run["out"] / "clip_embeddings")]
    args = matched["parse"](budget_args(models, training_data, out, *shared))[0]
    plan = matched["train_matched"](args)
    assert not any(p["trained_now"] for backend in ("ar", "unclip") for p in plan[backend]["stages"].values())
    assert not plan["embeddings_computed"]
    # another budget over the same runs is refused rather than mixed into them
    args = matched["parse"](budget_args(models, training_data, out, *shared))[0]
    args.train_budget_flops = 2 * BUDGET
    with pytest.raises(ConfigError, match="trained under another plan"):
        matched["train_matched"](args)


def test_backends_train_at_once_on_half_the_cores_and_a_failure_waits_for_the_other(tmp_path, monkeypatch, capsys):
    """train_backends' orchestration, its trainers replaced by a recorder (the real ones run in scaling_run): the
    unCLIP chain runs in a thread beside AR's, every process gets the threads, unCLIP's stages log to files, and a
    failing unCLIP stage is raised only after AR's stage has finished."""
    import threading
    import time

    calls = []

    def fake_stage(stage, argv, steps, env=None, log=None):
        calls.append((stage, threading.current_thread() is threading.main_thread(), env, log))
        if stage == "transformer":
            time.sleep(0.3)  # the decoder fails meanwhile; AR must still finish
        elif stage == "decoder" and "fail" in argv:
            raise SystemExit(f"error: train/train_decoder.py failed (exit status 1); see its output in {log}")
        calls.append((stage, "done"))
        return tmp_path / stage / "export", True

    monkeypatch.setitem(matched["train_backends"].__globals__, "train_stage", fake_stage)
    plans = lambda: {"ar": {"stages": {"transformer": {"steps": 3}}},  # noqa: E731
                     "unclip": {"stages": {"prior": {"steps": 1}, "decoder": {"steps": 2}}}}
    argv = {"transformer": ["t"], "prior": ["p"], "decoder": ["d"]}
    planned = plans()
    exports = matched["train_backends"](planned, argv, tmp_path, threads=1)
    assert exports == {s: tmp_path / s / "export" for s in ("transformer", "prior", "decoder")}
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert ("transformer", True, env, None) in calls  # AR in the main thread, its output on the terminal
    assert ("prior", False, env, tmp_path / "prior.log") in calls and ("decoder", False, env, tmp_path / "decoder.log") in calls
    assert planned["unclip"]["stages"]["decoder"] == {"steps": 2, "trained_now": True, "run": str(tmp_path / "decoder"),
                                                       "argv": ["d"]}
    assert "unCLIP's progress: tail -f" in capsys.readouterr().out

    calls.clear()
    with pytest.raises(SystemExit, match=r"train_decoder.py failed .* in .*decoder.log"):
        matched["train_backends"](plans(), {**argv, "decoder": ["fail"]}, tmp_path, threads=1)
    assert ("transformer", "done") in calls and ("decoder", "done") not in calls

    calls.clear()  # one backend after the other, in this thread, output on the terminal, no thread settings
    matched["train_backends"](plans(), argv, tmp_path, threads=None)
    assert [c for c in calls if c[1] != "done"] == [(s, True, None, None) for s in ("transformer", "prior", "decoder")]
    args = matched["parse"](["--train-budget-flops", "1e9", "--clip", "c", "--eval-clip", "e", "--device", "cpu",
                             "--sequential"])[0]
    assert matched["concurrent_threads"](args) is None


def test_budget_below_the_dvae_run_is_a_one_line_error(models, training_data, tmp_path):
    argv = budget_args(models, training_data, tmp_path / "r")
    argv[argv.index("--train-budget-flops") + 1] = "1e8"  # the fixture's dVAE run alone took 1.28e8
    with pytest.raises(ConfigError, match=r"--train-budget-flops 1e\+08 \(AR: dVAE .*\): budget 1e\+08 FLOPs does not "
                                          r"cover dvae 1.28e\+08 \(already trained\)") as e:
        train_matched(argv)
    assert "\n" not in str(e.value) and not (tmp_path / "r" / "runs" / "transformer").exists()


def test_budget_mode_refuses_exports_and_missing_inputs(models, training_data, tmp_path):
    with pytest.raises(ConfigError, match="drop --ar"):
        train_matched(budget_args(models, training_data, tmp_path / "r", "--ar", str(models["dalle"])))
    argv = budget_args(models, training_data, tmp_path / "r")
    argv[argv.index("--transformer-args") + 1] += " --steps 5"
    with pytest.raises(ConfigError, match="--transformer-args: --steps is set by train_matched.py"):
        train_matched(argv)
    only_ar = args(models, tmp_path / "r")
    for flag in ("--unclip-prior", "--unclip-decoder"):
        i = only_ar.index(flag)
        del only_ar[i:i + 2]
    with pytest.raises(ConfigError, match="--unclip-prior, --unclip-decoder missing: pass the trained exports"):
        compare(only_ar)


def test_budget_mode_takes_the_encoding_dvae_from_another_path_and_refuses_other_weights(models, training_data,
                                                                                         tmp_path):
    """A demo directory copied or moved after encoding: its token shards name the dVAE's old path, and --dvae at the
    new one holds the same weights, so training goes on; a dVAE with other weights is refused in one line, also for
    token shards whose meta.json predates the weights' sha256 (the shards' progress records name it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    moved = shutil.copytree(models["dvae"], tmp_path / "moved_dvae")
    other = shutil.copytree(models["dvae"], tmp_path / "other_dvae")
    weights = load_file(other / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 1}, other / "model.safetensors")
    tokens = Path(training_data["tokens"])
    old_meta = tmp_path / "old_meta" / "tokens"  # the same shards, meta.json without dvae_sha256
    shutil.copytree(tokens, old_meta)
    meta = json.loads((tokens / "meta.json").read_text())
    assert meta["dvae"] == str(Path(models["dvae"]).resolve()) and len(meta["dvae_sha256"]) == 64
    (old_meta / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dvae_sha256"}))

    def check(dvae, tokens_dir):
        argv = budget_args(models, {**training_data, "tokens": str(tokens_dir)}, tmp_path / "r", "--dvae", str(dvae))
        matched["check_training_inputs"](matched["parse"](argv)[0])

    for tokens_dir in (tokens, old_meta):
        check(moved, tokens_dir)
        with pytest.raises(ConfigError, match=r"meta.json: the tokens were encoded with .*, not --dvae .*other_dvae "
                                              r"\(other weights\); pass that dVAE or re-encode") as e:
            check(other, tokens_dir)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# train/compare_scaling.py and dalle_ar.scaling
# ------------------------------------------------------------------------------------------------

def test_scaling_trains_each_budget_on_one_embedding_precompute_and_reports(scaling_run, capsys):
    out, result = scaling_run["out"], scaling_run["result"]
    saved = json.loads((out / "report" / "scaling.json").read_text())
    assert saved["budgets"] == [BUDGET, 2 * BUDGET] and saved["verdict"] == result["verdict"]
    assert [(r["budget"], r["backend"]) for r in saved["rows"]] == [(b, k) for b in (BUDGET, 2 * BUDGET)
                                                                    for k in ("ar", "unclip")]
    for r in saved["rows"]:
        report = json.loads(Path(r["report"]).read_text())
        plan = report["train_budget"][r["backend"]]
        last = list(plan["stages"].values())[-1]["flops_per_step"]
        assert r["training_flops"] == report["cost"][r["backend"]]["training_flops"]
        assert 0 <= r["budget"] - r["training_flops"] < last  # each backend within one step of each budget
        best = max((s for s in report["settings"] if s["backend"] == r["backend"]),
                   key=lambda s: (s["caption_accuracy"], s["clip_score"]))
        assert r["setting"] == best["setting"] and r["caption_accuracy"] == best["caption_accuracy"]
        assert r["caption_accuracy_by_objects"] == best["caption_accuracy_by_objects"]
    # the embeddings were computed once, by the first budget, in the shared directory; the second reused them
    budgets = [json.loads((out / f"budget_{b}" / "runs" / "budget.json").read_text()) for b in ("2e9", "4e9")]
    assert [b["embeddings_computed"] for b in budgets] == [True, False]
    assert {b["embeddings"] for b in budgets} == {str(out / "clip_embeddings")}
    assert not list(out.glob("budget_*/runs/clip_embeddings"))
    md = (out / "report" / "report.md").read_text()
    assert saved["verdict"] in md and "At 2e9 FLOPs: " in md and "At 4e9 FLOPs: " in md
    assert "[budget_2e9/report.md](budget_2e9/report.md)" in md and "python train/compare_scaling.py" in md
    for b in ("2e9", "4e9"):  # each budget's report is copied beside it (not its runs): the directory stands alone
        copied = out / "report" / f"budget_{b}"
        assert (copied / "report.md").read_text() == (out / f"budget_{b}" / "report.md").read_text()
        assert (copied / "side_by_side.png").exists() and not (copied / "runs").exists()
    for png in ("scaling.png", "scaling_by_objects.png"):
        assert (out / "report" / png).stat().st_size > 1000, png

    # the same command again: both budgets are done, so nothing is trained or evaluated; the report is rebuilt
    # into a directory holding an earlier report of other budgets: their copies go, what else is there stays
    stale = out / "again" / "budget_9e9"
    stale.mkdir(parents=True)
    (stale / "report.json").write_text("{}")
    (out / "again" / "budget_notes").mkdir()
    capsys.readouterr()
    again = compare_scaling([*scaling_run["argv"], "--report", str(out / "again")])
    printed = capsys.readouterr().out
    assert printed.count("already made by this command; skipped") == 2
    assert again["rows"] == result["rows"] and (out / "again" / "report.md").exists()
    assert not stale.exists() and "budget_9e9: removed" in printed and (out / "again" / "budget_notes").is_dir()
    assert sorted(p.parent.name for p in (out / "again").glob("budget_*/report.md")) == ["budget_2e9", "budget_4e9"]


def test_embeddings_from_another_clip_or_other_images_are_refused(models, training_data, scaling_run, tmp_path):
    shared = scaling_run["out"] / "clip_embeddings"
    for flag, value in (("clip", str(models["eval_clip"])), ("train_images", training_data["tokens"])):
        args = matched["parse"](budget_args(models, training_data, tmp_path / "r", "--embeddings", str(shared)))[0]
        setattr(args, flag, value)
        with pytest.raises(ConfigError, match=rf"meta.json: made from .*, not --{flag.replace('_', '-')} .*; pass "
                                              r"another --embeddings directory") as e:
            matched["train_matched"](args)
        assert "\n" not in str(e.value) and not (tmp_path / "r").exists()
    # the same CLIP directory holding other weights; and a directory that holds only part of the shards
    meta = json.loads((shared / "meta.json").read_text())
    other = tmp_path / "emb"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({**meta, "clip_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="made from other weights than --clip"):
        embeddings.reusable(other, str(models["clip"]), training_data["images"])
    (other / "meta.json").write_text(json.dumps(meta))
    assert embeddings.reusable(shared, str(models["clip"]), training_data["images"])
    assert not embeddings.reusable(other, str(models["clip"]), training_data["images"])  # precompute_clip resumes it


@pytest.mark.parametrize("budgets", ["2e9", "2e9,2e9", "0,2e9", "2e9,lots"])
def test_scaling_needs_two_distinct_positive_budgets(budgets, tmp_path):
    with pytest.raises(ConfigError, match=rf"--budgets {budgets}: .*pass e.g. --budgets 2e13,4e13,8e13") as e:
        compare_scaling(["--budgets", budgets, "--out", str(tmp_path / "s")])
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()
    with pytest.raises(ConfigError, match="--train-budget-flops: --budgets sets each run's budget; drop it"):
        compare_scaling(["--budgets", "2e9,4e9", "--train-budget-flops", "2e9", "--out", str(tmp_path / "s")])


def row(budget, backend, acc, ci, one=None, two=None, seconds=0.01):
    """A hand-made scaling row; one/two: (accuracy, ci) on 1- and 2-shape prompts (8 prompts each)."""
    split = {n: {"accuracy": v[0], "ci": v[1], "prompts": 8} for n, v in (("1", one), ("2", two)) if v}
    return {"budget": budget, "backend": backend, "caption_accuracy": acc, "caption_accuracy_ci": ci,
            "caption_accuracy_by_objects": split, "seconds_per_image": seconds}


@pytest.mark.parametrize("ar, unclip, says, outcome", [
    ((0.50, [0.40, 0.60]), (0.10, [0.05, 0.20]), "AR ahead (95% CIs separate), caption accuracy AR 0.50 [0.40, 0.60] vs "
                                                 "unCLIP 0.10 [0.05, 0.20]", "AR ahead at 1"),
    ((0.30, [0.20, 0.40]), (0.25, [0.15, 0.35]), "within noise (CIs overlap; AR higher)", "within noise or without "
                                                                                          "intervals at 1"),
    ((0.10, [0.00, 0.20]), (0.60, [0.50, 0.70]), "unCLIP ahead (95% CIs separate)", "unCLIP ahead at 1"),
    ((0.10, None), (0.20, None), "unCLIP higher (no intervals to judge the noise", "within noise or without "
                                                                                   "intervals at 1"),
    ((0.20, [0.10, 0.30]), (0.20, [0.10, 0.30]), "tied, caption accuracy AR 0.20", "tied at 1"),
])
def test_verdict_says_who_leads_at_a_budget_and_whether_the_intervals_separate(ar, unclip, says, outcome):
    text = scaling.verdict([row(1e13, "ar", *ar), row(1e13, "unclip", *unclip)])
    assert f"At 1e13 FLOPs: {says}" in text and outcome in text and "one budget, no trend" in text


def test_verdict_trend_objects_and_cost_are_computed_from_the_rows():
    rows = [row(1e13, "ar", 0.30, [0.22, 0.40], seconds=0.01), row(1e13, "unclip", 0.10, [0.05, 0.20], seconds=0.14),
            row(4e13, "ar", 0.60, [0.50, 0.70], one=(0.80, [0.70, 0.90]), two=(0.40, [0.30, 0.50]), seconds=0.02),
            row(4e13, "unclip", 0.15, [0.05, 0.25], one=(0.20, [0.05, 0.35]), two=(0.10, [0.00, 0.20]), seconds=0.14)]
    text = scaling.verdict(rows)
    assert "At 1e13 FLOPs: AR ahead" in text and "At 4e13 FLOPs: AR ahead" in text
    assert "AR ahead at 2, unCLIP ahead at 0" in text
    assert ("AR: caption accuracy 0.30 (1e13) -> 0.60 (4e13): up 0.30 from the first to the last budget, beyond noise "
            "(the first and last budgets' CIs separate)") in text
    assert "unCLIP: caption accuracy 0.10 (1e13) -> 0.15 (4e13): up 0.05 from the first to the last budget, within noise" in text
    assert ("AR at 4e13: 1-shape prompts 0.80 [0.70, 0.90] (n=8) vs 2-shape 0.40 [0.30, 0.50] (n=8): 1-shape higher by "
            "0.40 (CIs separate)") in text
    assert "unCLIP at 4e13: 1-shape prompts 0.20 [0.05, 0.35] (n=8) vs 2-shape 0.10 [0.00, 0.20] (n=8): 1-shape higher by 0.10 (within noise, CIs overlap)" in text
    assert "1e13: AR 0.01 s, unCLIP 0.14 s (unCLIP 14.0x AR's); 4e13: AR 0.02 s, unCLIP 0.14 s (unCLIP 7.0x AR's)" in text
    rows[3]["caption_accuracy_by_objects"].pop("2")
    assert "unCLIP at 4e13: no 2-shape prompts, no gap to report." in scaling.verdict(rows)


def test_best_setting_is_the_highest_caption_accuracy_then_clip_score():
    settings = [{"backend": "ar", "setting": "a", "caption_accuracy": 0.5, "clip_score": 80},
                {"backend": "ar", "setting": "b", "caption_accuracy": 0.5, "clip_score": 90},
                {"backend": "ar", "setting": "c", "caption_accuracy": 0.4, "clip_score": 99},
                {"backend": "unclip", "setting": "d", "caption_accuracy": 0.9, "clip_score": 99}]
    assert scaling.best_setting(settings, "ar")["setting"] == "b"
    with pytest.raises(ConfigError, match="pass --synthetic-prompts N"):
        scaling.best_setting([{**settings[0], "caption_accuracy": None}], "ar")


def test_committed_reports_name_their_runs_inside_the_clone_they_ran_in():
    """The committed comparison reports name each model's run relative to the clone's root (as `metrics.run_info`
    writes it), never a path of the machine that made them."""
    reports = sorted((ROOT / "docs" / "compare").rglob("report.json"))
    assert len(reports) >= 7
    runs = []

    def collect(node):
        if isinstance(node, dict):
            runs.extend(v for k, v in node.items() if k == "run" and isinstance(v, str))
            [collect(v) for v in node.values()]
        elif isinstance(node, list):
            [collect(v) for v in node]

    for path in reports:
        collect(json.loads(path.read_text()))
    assert runs and all(not Path(r).is_absolute() and r.startswith("outputs/") for r in runs), runs
