"""Shapes-world evaluation: the caption report and the CLIP discrimination test measure what they claim."""

import numpy as np
import pytest
import torch

from dalle_ar.data import synthetic as S
from dalle_ar.evaluation import caption_report, clip_discrimination


def tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def scenes(n: int, shapes: int, seed: int = 7) -> list[S.Scene]:
    out, i = [], 0
    while len(out) < n:
        sc = S.sample_scene(np.random.default_rng([seed, i]))
        i += 1
        if len(sc.shapes) == shapes:
            out.append(sc)
    return out


def test_caption_report_separates_generator_and_reranker():
    # 4 prompts x 3 candidates: candidate 0 right for prompts 0-2 (none for prompt 3, whose candidates all have the
    # wrong colour); the "clip" order finds it for prompts 0-1, misses it for prompt 2.
    rng = np.random.default_rng(0)
    prompts, images = [], []
    for p, sc in enumerate(scenes(2, 1) + scenes(2, 2)):
        prompts.append(S.caption(sc))
        wrong = [S.render(S.perturb(sc, "colour", rng)) for _ in range(3)]
        images.append(torch.stack([tensor(im) for im in ([S.render(sc)] + wrong[1:] if p < 3 else wrong)]))
    orders = {"clip": torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]]), "sampling": torch.arange(3).expand(4, 3)}
    r = caption_report(torch.stack(images), prompts, orders)
    assert r["per_candidate"] == pytest.approx(3 / 12)
    assert r["oracle"] == pytest.approx(3 / 4)
    assert r["top1"] == {"clip": pytest.approx(2 / 4), "sampling": pytest.approx(3 / 4)}
    assert r["rerank_efficiency"]["clip"] == pytest.approx(2 / 3) and r["rerank_efficiency"]["sampling"] == pytest.approx(1)
    assert r["attributes"]["colour"] == pytest.approx(3 / 12)
    # (right, wrong) pairs: 2 in each of prompts 0-2; the clip order puts the right one first in 5 of the 6
    assert r["pairwise"]["clip"]["all"] == {"accuracy": pytest.approx(5 / 6), "pairs": 6}
    assert r["pairwise"]["sampling"]["all"] == {"accuracy": 1.0, "pairs": 6}
    named = {k: v["pairs"] for k, v in r["pairwise"]["clip"].items() if k != "all"}
    assert sum(named.values()) == 6 and set(named) <= {"colour", "several"}
    assert r["by_objects"]["1"]["oracle"] == 1.0 and r["by_objects"]["2"]["oracle"] == pytest.approx(0.5)
    assert r["by_objects"]["1"]["attributes"].keys() == {"colour", "shape", "size", "count", "position"}
    assert r["check"][0] == [True, False, False] and r["check"][3] == [False, False, False]


class CheckScorer:
    """A reference 'CLIP' that scores by the pixel check: it discriminates perfectly, by construction."""

    def scores(self, images, texts):
        return torch.tensor([[float(S.check(im, t)) for t in texts] for im in images])


class BlindScorer:
    """A 'CLIP' that ignores the image: it cannot tell a right render from a wrong one."""

    def scores(self, images, texts):
        return torch.zeros(len(images), len(texts))


def test_clip_discrimination_tells_a_perfect_scorer_from_a_blind_one():
    perfect = clip_discrimination(CheckScorer(), num_scenes=40)
    assert perfect["pairwise_accuracy"] >= 0.95 and perfect["pairs"] == 40 * 4
    assert set(perfect["per_attribute"]) == {"colour", "shape", "size", "position", "relation"}
    binding = perfect["binding"]  # swaps within the two-shape scenes, apart from the one-attribute pairs
    assert binding["pairwise_accuracy"] >= 0.95 and binding["pairs"] >= 20 and set(binding["per_swap"]) == {"colour", "shape"}
    blind = clip_discrimination(BlindScorer(), num_scenes=40)
    assert blind["pairwise_accuracy"] == 0.0 and blind["binding"]["pairwise_accuracy"] == 0.0


def test_demo_spread_reports_mean_and_spread_over_runs(tmp_path):
    import json

    from bench.demo_spread import main

    for seed, (top1, psnr) in enumerate([(0.5, 24.0), (0.7, 26.0), (0.6, 25.0)]):
        run = tmp_path / f"demo_seed{seed}"
        (run / "eval").mkdir(parents=True)
        caption = {"per_candidate": top1 - 0.2, "oracle": 0.9, "top1": {"clip": top1}, "attributes": {"shape": 0.8}}
        (run / "eval" / "scores.json").write_text(json.dumps({"summary": {"device": "cpu", "caption": caption}}))
        (run / "dvae_quality.json").write_text(json.dumps({"psnr_db": psnr, "codebook_usage": 0.9,
                                                             "recon_caption_accuracy": 0.5}))
        (run / ".seconds").write_text("700")
        (run / "machine.json").write_text(json.dumps({"fp32_matmul_gflops": 130.0 + 10 * seed}))
    result = main([str(tmp_path / f"demo_seed{s}") for s in range(3)] + ["--out", str(tmp_path / "spread.json")])
    top1 = result["spread"]["caption.top1.clip"]
    assert top1["mean"] == pytest.approx(0.6) and top1["std"] == pytest.approx(0.1)
    assert (top1["min"], top1["max"]) == (0.5, 0.7)
    assert result["spread"]["dvae.psnr_db"]["mean"] == pytest.approx(25.0) and result["runs"] == 3
    assert result["per_run"][str(tmp_path / "demo_seed2")]["fp32_matmul_gflops"] == 150.0
    assert json.loads((tmp_path / "spread.json").read_text())["spread"]["job_seconds"]["std"] == 0.0


def test_quality_curve_reports_each_run_and_the_worst_seed_per_step_count(tmp_path):
    import json

    from bench.quality_curve import main

    runs = []
    for recipe, seed, steps, top1 in [("a", 0, 100, 1.0), ("a", 1, 100, 0.8), ("a", 1, 200, 0.9), ("b", 1, 200, 0.6)]:
        run = tmp_path / f"{recipe}{seed}_{steps}"
        run.mkdir()
        caption = {"per_candidate": top1 - 0.1, "oracle": 1.0, "top1": {"clip": top1, "likelihood": 0.5},
                   "rerank_efficiency": {"clip": top1}, "by_objects": {"2": {"per_candidate": 0.4}}}
        (run / "scores.json").write_text(json.dumps({"summary": {"caption": caption}}))
        runs += ["--run", recipe, str(seed), str(steps), str(60 * steps), str(run)]
    result = main([*runs, "--out", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png")])
    assert [(p["recipe"], p["seed"], p["steps"], p["minutes"]) for p in result["points"]] == [
        ("a", 0, 100, 100), ("a", 1, 100, 100), ("a", 1, 200, 200), ("b", 1, 200, 200)]
    assert result["points"][2]["two_object_per_candidate"] == 0.4
    assert list(result["by_steps"]) == ["a, 100 steps", "a, 200 steps", "b, 200 steps"]  # recipes are not pooled
    first = result["by_steps"]["a, 100 steps"]
    assert first["seeds"] == [0, 1] and first["clip_top1"]["min"] == 0.8 and first["clip_top1"]["mean"] == pytest.approx(0.9)
    assert first["clip_top1"]["std"] == pytest.approx(0.1414, abs=1e-4) and first["minutes"]["max"] == 100
    assert "seed" not in first and "steps" not in first  # only the figures are spread
    assert result["by_steps"]["a, 200 steps"]["per_candidate"]["min"] == pytest.approx(0.8)
    assert result["by_steps"]["b, 200 steps"]["clip_top1"] == {"mean": 0.6, "std": 0.0, "min": 0.6, "max": 0.6}
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert json.loads((tmp_path / "c.json").read_text()) == result
