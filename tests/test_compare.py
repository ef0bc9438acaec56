"""sample/compare.py builds its report end to end from tiny (untrained) models made here: a DALL-E + dVAE
export, a prior + decoder export, and two different CLIPs; and it refuses an evaluator equal to the rerank CLIP.
train/train_matched.py --train-budget-flops trains tiny models on tiny shards so that each backend's counted training
FLOPs come to the budget, then reports on them with compare.py (the planner, metrics.plan_steps, is checked against
hand-computed values)."""

import json
import runpy

import pytest
from conftest import ROOT, tiny_exports

from dalle_ar import metrics
from dalle_ar.config import ConfigError
from dalle_ar.data import synthetic, write

script = runpy.run_path(str(ROOT / "sample/compare.py"))
compare = script["main"]
matched = runpy.run_path(str(ROOT / "train/train_matched.py"))
train_matched = matched["main"]


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
    assert un["nfe_calls"] == 2 + 2 and un["nfe_rows"] == 2 * 2 * 2 + 2 * 2
    cost = saved["cost"]
    assert set(cost["ar"]["params"]) == {"transformer", "dvae", "total"}
    assert set(cost["unclip"]["params"]) == {"prior", "decoder", "total"}
    for backend in ("ar", "unclip"):
        stages = cost[backend]["training"]
        assert all(s["steps"] == 5 and s["flops"] == 5 * s["flops_per_step"] > 0 for s in stages.values())
        assert cost[backend]["training_flops"] == sum(s["flops"] for s in stages.values())
    assert saved["real"]["caption_accuracy"] == 1.0  # the world's own renders pass its checker
    assert saved["best"]["ar"] in ("AR N=1 T=1", "AR N=2 T=1") and report["best"] == saved["best"]
    md = (out / "report.md").read_text()
    assert "| AR N=2 T=1 |" in md and "## Training cost" in md and "![side by side](side_by_side.png)" in md
    for png in ("quality_vs_training_flops.png", "quality_vs_seconds.png", "clip_score_vs_diversity.png",
                "accuracy_vs_seconds.png", "side_by_side.png"):
        assert (out / png).stat().st_size > 1000, png


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


def budget_args(m, data, out, *extra):
    return ["--train-budget-flops", f"{BUDGET:g}", "--train-images", data["images"], "--train-tokens", data["tokens"],
            "--tokenizer", str(m["dir"] / "tokenizer.json"), "--clip", str(m["clip"]), "--eval-clip", str(m["eval_clip"]),
            "--budget-prior-share", "0.1", *TINY, "--synthetic-prompts", "2", "--samples-per-prompt", "2",
            "--real-images", "8", "--bootstrap", "10", "--timing-images", "1", "--ar-rerank", "1",
            "--unclip-guidance", "3", "--unclip-steps", "2", "--batch-size", "8", "--no-progress", "--out", str(out),
            *extra]


def test_matched_budget_trains_both_backends_to_the_budget(models, training_data, tmp_path):
    out = tmp_path / "report"
    report = train_matched(budget_args(models, training_data, out))
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
    assert report["models"]["ar"] == str(out / "runs" / "transformer" / "export")
    md = (out / "report.md").read_text()
    assert "## Matched training budget" in md and "`--train-budget-flops 2e+09`" in md

    # the same command again: every run is finished, so nothing is retrained (only planned and checked)
    args = matched["parse"](budget_args(models, training_data, out))[0]
    plan = matched["train_matched"](args)
    assert not any(p["trained_now"] for backend in ("ar", "unclip") for p in plan[backend]["stages"].values())
    # another budget over the same runs is refused rather than mixed into them
    args = matched["parse"](budget_args(models, training_data, out))[0]
    args.train_budget_flops = 2 * BUDGET
    with pytest.raises(ConfigError, match="trained under another plan"):
        matched["train_matched"](args)


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
