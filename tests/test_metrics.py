"""dalle_ar.metrics against values worked out by hand on tiny feature sets, and the compute counters."""

import json

import numpy as np
import pytest
import torch

from dalle_ar.config import DalleConfig, DiffusionConfig, PriorConfig, UnetConfig
from dalle_ar.metrics import (
    bootstrap_ci,
    count_flops,
    count_params,
    diversity,
    frechet_distance,
    kid,
    mmd2_unbiased,
    pairwise_distance_mean,
    run_info,
    stage_training_flops,
)
from dalle_ar.model import DalleTransformer
from dalle_ar.models import train_step
from dvae.config import DVAEConfig


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 6))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.tensor(x), x + 0.0) == pytest.approx(0.0, abs=1e-9)  # tensors too


def test_frechet_distance_of_1d_gaussians():
    """In 1-D, FD = (mu1 - mu2)^2 + s1^2 + s2^2 - 2 s1 s2 = (mu1 - mu2)^2 + (s1 - s2)^2 with the sample
    moments (ddof = 1)."""
    a = np.array([1.0, 2.0, 3.0, 4.0])          # mean 2.5, var 5/3
    b = np.array([0.0, 4.0, 8.0])               # mean 4, var 16
    expected = (2.5 - 4.0) ** 2 + (np.sqrt(5 / 3) - 4.0) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_adds_per_dimension():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 2)) * [1.0, 2.0]
    b = rng.normal(size=(400, 2)) * [3.0, 0.5] + [1.0, -1.0]
    per_dim = sum(frechet_distance(a[:, i], b[:, i]) for i in range(2))
    assert frechet_distance(a, b) == pytest.approx(per_dim, rel=0.05)  # sample covariances are nearly diagonal
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(a, b[:, :1])


def test_kid_hand_computed_case():
    """x = {0, 1}, y = {2, 3} in 1-D, k(x, y) = (xy + 1)^3: off-diagonal k(x, x) = 1, k(y, y) = 343,
    k(x, y) in {1, 1, 27, 64} -> MMD^2 = 1 + 343 - 2 * 93/4 = 297.5."""
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert mmd2_unbiased(x, y) == pytest.approx(297.5)
    mean, std = kid(x, y, subsets=10, subset_size=10)
    assert mean == pytest.approx(297.5) and std == 0.0  # the whole sets: one subset


def test_kid_of_identical_distributions_is_near_zero_and_of_shifted_is_not():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, _ = kid(a, b, subsets=20, subset_size=100, generator=0)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=100, generator=0)
    assert abs(same) < 0.02 and shifted > 0.5
    assert kid(a, b, 20, 100, generator=0) == kid(a, b, 20, 100, generator=0)


def test_diversity_on_three_points():
    """cosine: (1,0), (0,1), (-1,0) -> distances 1, 2, 1 -> 4/3; l2: (0,0), (3,0), (0,4) -> 3, 4, 5 -> 4."""
    assert pairwise_distance_mean([[1, 0], [0, 1], [-1, 0]]) == pytest.approx(4 / 3)
    assert pairwise_distance_mean([[0, 0], [3, 0], [0, 4]], metric="l2") == pytest.approx(4.0)
    groups = [np.array([[1.0, 0], [0, 1], [-1, 0]]), np.array([[1.0, 0], [2.0, 0]])]  # 4/3 and 0
    assert diversity(groups) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        diversity([np.ones((1, 2))])


def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).normal(3.0, 1.0, size=200)
    lo, hi = bootstrap_ci(values, np.mean, n=500, alpha=0.05, generator=np.random.default_rng(7))
    assert lo < values.mean() < hi and hi - lo < 0.5
    # ~ +-1.96 sigma / sqrt(n) around the mean
    assert (hi - lo) == pytest.approx(2 * 1.96 * values.std() / np.sqrt(200), rel=0.25)
    assert bootstrap_ci(values, np.mean, 500, 0.05, np.random.default_rng(7)) == (lo, hi)
    assert bootstrap_ci(values, np.mean, 500, 0.05, np.random.default_rng(8)) != (lo, hi)
    # rows of a feature matrix resample together (a set-level statistic such as FD)
    feats = np.random.default_rng(1).normal(size=(40, 3))
    lo, hi = bootstrap_ci(feats, lambda f: frechet_distance(f, feats), n=50, generator=0)
    assert 0 <= lo <= hi


def test_count_params_by_stage():
    a, b = torch.nn.Linear(3, 4), torch.nn.Conv2d(2, 5, 3)
    assert count_params({"a": a, "b": b, "absent": None}) == {"a": 16, "b": 95, "total": 111}


def test_count_flops_of_a_matmul_and_its_backward():
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    assert count_flops(lambda: x @ w) == 2 * 8 * 16 * 32
    assert count_flops(lambda: (x @ w).sum().backward()) == 3 * 2 * 8 * 16 * 32  # backward: two matmuls


@pytest.mark.parametrize("kind", ["dalle", "dvae", "unclip_prior", "unclip_decoder"])
def test_train_step_flops_of_each_stage(kind):
    """One forward + backward step: the transformer near its analytic estimate, every stage linear in the batch,
    and counting never changes the weights."""
    torch.manual_seed(0)
    if kind == "dalle":
        cfg = DalleConfig(text_vocab_size=50, text_len=8, num_image_tokens=64, image_fmap_size=4, dim=32, depth=2, heads=2)
        model, export = DalleTransformer(cfg), {"kind": "dalle"}
        step = count_flops(train_step(model, export, 4))
        # the 6N + 12 L d seq estimate per token (PaLM appendix B), which bench/train_throughput.py also checks
        assert step == pytest.approx(model.flops_per_token() * 4 * cfg.seq_len, rel=0.25)
        return
    if kind == "dvae":
        from dvae import DiscreteVAE
        model = DiscreteVAE(DVAEConfig(image_size=32, num_tokens=64, group_count=4, n_hid=8, n_blk_per_group=1, n_init=16))
        export = {"kind": "dvae", "loss": {"reconstruction": "mse", "kl_weight": 0.0}}
    elif kind == "unclip_prior":
        from dalle_ar.unclip.prior import DiffusionPrior
        model = DiffusionPrior(PriorConfig(embed_dim=16, text_len=8, text_vocab_size=40, dim=32, depth=1, heads=2),
                               DiffusionConfig(target="x0"))
        export = {"kind": "unclip_prior"}
    else:
        from dalle_ar.unclip.decoder import UnetDecoder
        model = UnetDecoder(UnetConfig(image_size=16, channels=8, channel_mult="1,2", num_res_blocks=1,
                                       attention_resolutions="8", head_channels=8, embed_dim=16), DiffusionConfig())
        export = {"kind": "unclip_decoder"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f2, f4 = (count_flops(train_step(model, export, b)) for b in (2, 4))
    assert f2 > 0 and f4 == pytest.approx(2 * f2, rel=0.05)  # linear in the batch
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no optimizer step


def test_stage_training_flops_reads_steps_from_the_run(tmp_path):
    cfg = DalleConfig(text_vocab_size=50, text_len=8, num_image_tokens=64, image_fmap_size=4, dim=32, depth=1, heads=2)
    model = DalleTransformer(cfg)
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    assert run_info(export)["steps"] is None and stage_training_flops(model, export, {"kind": "dalle"})["flops"] is None
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"steps": 100, "batch_size": 4, "grad_accum": 2}))
    out = stage_training_flops(model, export, {"kind": "dalle"})
    assert out["steps"] == 100 and out["source"] == "train_config.json"
    assert out["flops"] == 100 * out["flops_per_step"] == 100 * 2 * count_flops(train_step(model, {"kind": "dalle"}, 4))
    # a data-parallel run: every rank's steps count (the world size its trainer recorded)
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"steps": 100, "batch_size": 4, "grad_accum": 2,
                                                                     "world_size": 3}))
    assert stage_training_flops(model, export, {"kind": "dalle"})["flops"] == 3 * out["flops"]
    # a run stopped early: the last logged step counts
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 40, "loss": 2.0}\n')
    assert stage_training_flops(model, export, {"kind": "dalle"})["steps"] == 40
    # the latest checkpoint knows the exact step (metrics are logged every few steps)
    (tmp_path / "run" / "checkpoints").mkdir()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000047\n")
    assert run_info(export)["steps"] == 47
    # the run's folder as reports record it: relative under the working directory, absolute elsewhere
    assert run_info(export)["run"] == str(tmp_path / "run")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert run_info("run/export/")["run"] == run_info(export)["run"] == "run"
        mp.chdir(export)  # the run is above the working directory
        assert run_info(".")["run"] == str(tmp_path / "run")


def test_grid_tile_labels_wrap_to_the_tile_instead_of_being_cut(tmp_path):
    """A rank, CLIP score and likelihood under a 64 px tile do not fit one line: the band grows a line, and each tile's
    label is drawn whole (the band under it is not blank where a cut label would end)."""
    import numpy as np
    from PIL import Image

    from dalle_ar.report import save_grid

    images = torch.zeros(4, 3, 64, 64)
    short = save_grid(images, tmp_path / "short.png", nrow=2, tile_labels=["#1 cos 0.97"] * 4)
    full = save_grid(images, tmp_path / "long.png", nrow=2, tile_labels=["#1 cos 0.974 (97) ll -170"] * 4)
    h_short, h_long = Image.open(short).size[1], Image.open(full).size[1]
    assert h_long == h_short + 2 * 12  # one more 12 px line under each of the two rows
    band = np.asarray(Image.open(full).convert("L"))[132 + 12:132 + 24, 4:128]  # the second line under tile 1
    assert (band < 128).any()  # "-170" is there
