"""sample/compare.py builds its report end to end from tiny (untrained) models made here: a DALL-E + dVAE
export, a prior + decoder export, and two different CLIPs; and it refuses an evaluator equal to the rerank CLIP."""

import json
import runpy

import pytest
import torch
from conftest import ROOT

from dalle_ar.checkpoint import save_pretrained
from dalle_ar.clip import build_clip, clip_export_config, export_files
from dalle_ar.config import ClipConfig, ConfigError, DalleConfig, DiffusionConfig, DVAEConfig, PriorConfig, UnetConfig
from dalle_ar.data import synthetic
from dalle_ar.model import DalleTransformer
from dalle_ar.text import TextTokenizer, train_bpe
from dalle_ar.unclip.decoder import UnetDecoder
from dalle_ar.unclip.prior import DiffusionPrior
from dvae import DiscreteVAE

compare = runpy.run_path(str(ROOT / "sample/compare.py"))["main"]


def export(model, run_dir, config, extra=None, steps=5, batch_size=2):
    """An export plus the train_config.json a trainer writes beside it (for the FLOP accounting)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size, "grad_accum": 1}))
    return save_pretrained(model, run_dir / "export", config, extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    torch.manual_seed(0)
    tok = TextTokenizer(train_bpe([synthetic.make_example(i)[1] for i in range(200)], vocab_size=120), 12)
    tok.save(d / "tokenizer.json")
    dvae_cfg = DVAEConfig(image_size=32, num_tokens=32, group_count=2, n_hid=8, n_blk_per_group=1, n_init=8)
    dvae = export(DiscreteVAE(dvae_cfg), d / "dvae", {"kind": "dvae", "dvae": dvae_cfg.__dict__,
                                                      "loss": {"reconstruction": "mse", "kl_weight": 0.0}})
    dalle_cfg = DalleConfig(text_vocab_size=tok.vocab_size, text_len=12, num_image_tokens=32, image_fmap_size=4,
                            dim=32, depth=1, heads=2)
    dalle = export(DalleTransformer(dalle_cfg), d / "dalle", {"kind": "dalle", "dvae": str(dvae), "model": dalle_cfg.__dict__},
                   {"tokenizer.json": str(d / "tokenizer.json")})
    clips = {}
    for name, seed, patch in (("clip", 0, 16), ("eval_clip", 1, 8)):  # another seed and architecture
        torch.manual_seed(seed)
        cfg = ClipConfig(image_size=32, embed_dim=16, vision_layers=1, vision_width=64, patch_size=patch,
                         context_length=16, text_width=32, text_heads=2, text_layers=1)
        clips[name] = export(build_clip(cfg), d / name, clip_export_config(cfg), export_files(cfg, d / f"{name}_oc"))
    prior = DiffusionPrior(PriorConfig(embed_dim=16, text_len=12, text_vocab_size=tok.vocab_size, dim=32, depth=1, heads=2),
                           DiffusionConfig(target="x0"))
    prior_dir = export(prior, d / "prior", prior.export_config(clip=str(clips["clip"])),
                       {"tokenizer.json": str(d / "tokenizer.json")})
    decoder = UnetDecoder(UnetConfig(image_size=16, channels=8, channel_mult="1,2", num_res_blocks=1,
                                     attention_resolutions="8", head_channels=8, embed_dim=16), DiffusionConfig())
    decoder_dir = export(decoder, d / "decoder", decoder.export_config(stage="base", clip=str(clips["clip"])))
    return {"dir": d, "dalle": dalle, "prior": prior_dir, "decoder": decoder_dir, **clips}


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
