"""unCLIP: the diffusion core against closed-form answers, the prior and decoder learn, the scripts run on
tiny data (precompute resumes, the prior's sampled embeddings move towards the true ones, exports hold
the EMA weights), and the pipeline generates and edits images deterministically."""

import json
import runpy
import shutil
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from dalle_ar import models
from dalle_ar.checkpoint import save_pretrained
from dalle_ar.clip import ClipScorer, build_clip, clip_export_config, export_files
from dalle_ar.config import ClipConfig, DiffusionConfig, PriorConfig, UnetConfig
from dalle_ar.data import read
from dalle_ar.data.embeddings import embedding_dataset
from dalle_ar.text import TextTokenizer, train_bpe
from dalle_ar.unclip import loop
from dalle_ar.unclip.decoder import AttentionBlock, UnetDecoder, sin_cos_2d
from dalle_ar.unclip.diffusion import GaussianDiffusion, alphas_cumprod, conditional, guided
from dalle_ar.unclip.pipeline import UnclipPipeline, slerp
from dalle_ar.unclip.prior import DiffusionPrior

precompute = runpy.run_path(str(ROOT / "train/precompute_clip.py"))["main"]
train_prior = runpy.run_path(str(ROOT / "train/train_prior.py"))["main"]
train_decoder = runpy.run_path(str(ROOT / "train/train_decoder.py"))["main"]
unclip_edit = runpy.run_path(str(ROOT / "sample/unclip_edit.py"))["main"]

CLIP = ClipConfig(image_size=64, embed_dim=32, vision_layers=1, vision_width=64, patch_size=16, context_length=16,
                  text_width=32, text_heads=2, text_layers=1)
PRIOR = PriorConfig(embed_dim=32, text_len=12, text_vocab_size=64, dim=64, depth=2, heads=4)
UNET = UnetConfig(image_size=16, channels=16, channel_mult="1,2", num_res_blocks=1, attention_resolutions="8",
                  head_channels=16, embed_dim=32)
QUIET = ["--wandb", "disabled", "--no-progress", "--zero_stage", "0"]


# ------------------------------------------------------------------------------------------------
# the diffusion core
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedules_decrease_from_one_to_nearly_zero(schedule):
    acp = alphas_cumprod(schedule, 1000)
    assert (acp[1:] < acp[:-1]).all() and acp[0] > 0.999 and acp[-1] < 1e-3 and acp[-1] > 0
    if schedule == "cosine":  # improved DDPM: abar_t = cos^2(((t/T + s)/(1 + s)) pi/2) / f(0)
        s, t = 0.008, 500
        f = lambda u: torch.cos(torch.tensor((u + s) / (1 + s) * torch.pi / 2, dtype=torch.float64)) ** 2  # noqa: E731
        assert acp[t - 1].item() == pytest.approx((f(t / 1000) / f(0)).item(), rel=1e-6)


def test_q_sample_has_the_forward_process_moments():
    d = GaussianDiffusion.from_config("cosine", 1000, "eps")
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 0.7)
    for step in (10, 500, 900):
        t = torch.full((len(x0),), step)
        x = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        a = d.alphas_cumprod[step].item()
        assert x.mean().item() == pytest.approx(a ** 0.5 * 0.7, abs=0.02)
        assert x.std().item() == pytest.approx((1 - a) ** 0.5, abs=0.02)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_each_target_converts_back_to_x0_and_eps(target):
    d = GaussianDiffusion.from_config("linear", 1000, target)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    x_t = d.q_sample(x0, t, noise)
    x0_back, eps_back = d.x0_eps(d.target_of(x0, noise, t), x_t, t)
    assert torch.allclose(x0_back, x0, atol=1e-4) and torch.allclose(eps_back, noise, atol=1e-4)


def gaussian_denoiser(d: GaussianDiffusion, mu: float, sigma: float):
    """The exact E[x0 | x_t] for data x0 ~ N(mu, sigma^2), as a network predicting d.target would."""
    def denoise(x, t):
        i = torch.searchsorted(d.timestep_map, t)  # the model sees original timesteps
        a = d.alphas_cumprod[i].float().view(-1, *[1] * (x.ndim - 1))
        x0 = mu + a.sqrt() * sigma ** 2 / (a * sigma ** 2 + 1 - a) * (x - a.sqrt() * mu)
        return d.target_of(x0, (x - a.sqrt() * x0) / (1 - a).sqrt(), i)
    return denoise


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_samplers_recover_the_data_distribution(target):
    """With the exact denoiser for N(mu, sigma^2) data, DDPM and DDIM (eta 0 and 1) samples on a respaced
    schedule have the data's mean and standard deviation."""
    d = GaussianDiffusion.from_config("cosine", 1000, target).respace(50)
    denoise = gaussian_denoiser(d, mu=1.5, sigma=0.5)
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)):
        x = loop.sample(d, denoise, (5000, 1), sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(0))
        assert x.mean().item() == pytest.approx(1.5, abs=0.04), (sampler, eta)  # standard error ~0.007
        assert x.std().item() == pytest.approx(0.5, abs=0.04), (sampler, eta)


def test_ddim_with_eta_one_on_all_steps_is_ddpm():
    """DDIM's eta = 1 variance is DDPM's posterior variance and its mean the posterior mean: with the same
    generator both walk the same path (a network-like denoiser, x0 clipping on)."""
    d = GaussianDiffusion.from_config("cosine", 200, "eps", clip_x0=1.0)
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 0.3
    denoise = lambda x, t: torch.tanh(x @ w) + 1e-3 * t[:, None]  # noqa: E731
    a = loop.ddpm_sample(d, denoise, (16, 6), generator=torch.Generator().manual_seed(3))
    b = loop.ddim_sample(d, denoise, (16, 6), eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    c = loop.ddim_sample(d, denoise, (16, 6), eta=0.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(a, c, atol=1e-2)  # and eta = 0 is a different (deterministic) sampler


def test_ddim_eta0_is_deterministic_and_inverts():
    d = GaussianDiffusion.from_config("cosine", 1000, "eps").respace(250)
    denoise = gaussian_denoiser(d, mu=0.3, sigma=0.4)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    x1 = loop.ddim_sample(d, denoise, noise.shape, noise=noise, generator=torch.Generator().manual_seed(1))
    x2 = loop.ddim_sample(d, denoise, noise.shape, noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(x1, x2)  # eta 0: the generator is never used beyond the start noise
    back = loop.ddim_sample(d, denoise, noise.shape, noise=loop.ddim_invert(d, denoise, x1))
    # inversion is first order in the step size: ~1/250 of the data scale here (measured 0.004 mean, 0.02 max)
    assert (back - x1).abs().mean() < 0.01 and torch.allclose(back, x1, atol=0.04), (back - x1).abs().max()


def test_text_guidance_guides_the_caption_apart_from_the_image_embedding():
    """guided(..., text_scale): u + s (c_image - u) + t (c - c_image), three rows in one forward, on the real decoder's
    dict drops; t equal to s is plain guidance."""
    torch.manual_seed(0)
    cfg = UnetConfig(**{**asdict(UNET), "use_caption": True, "text_vocab_size": 64, "text_len": 12})
    model, x = UnetDecoder(cfg, DiffusionConfig()).eval(), torch.randn(3, 3, 16, 16)
    cond = {"image_embed": F.normalize(torch.randn(3, 32), dim=-1), "text": torch.randint(1, 64, (3, 12))}
    with torch.no_grad():
        model.null_image_embed.normal_()
        for p in model.parameters():  # zero-initialised output layers would hide any difference
            p.add_(torch.randn_like(p) * 0.05)
    t = torch.tensor([3, 400, 999])
    keep, drop = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        c = model(x, t, cond, {"image": keep, "text": keep})
        c_image = model(x, t, cond, {"image": keep, "text": drop})
        u = model(x, t, cond, {"image": drop, "text": drop})
        assert (c - c_image).abs().max() > 1e-3 and (c_image - u).abs().max() > 1e-3
        assert torch.allclose(guided(model, cond, 2.0, 5.0)(x, t), u + 2 * (c_image - u) + 5 * (c - c_image), atol=1e-4)
        assert torch.equal(guided(model, cond, 3.0, 3.0)(x, t), guided(model, cond, 3.0)(x, t))
        with pytest.raises(ValueError, match="use_caption"):
            UnetDecoder(UNET, DiffusionConfig()).sample(cond["image_embed"], steps=2, text_guidance=4.0)


def test_seeded_sampling_is_reproducible():
    d = GaussianDiffusion.from_config("linear", 100, "v").respace(10)
    denoise = gaussian_denoiser(d, 0.0, 1.0)
    run = lambda seed: loop.ddpm_sample(d, denoise, (4, 3), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


@pytest.mark.parametrize("kind", ["prior", "decoder"])
def test_guidance_scale_one_is_the_conditional_output(kind):
    torch.manual_seed(0)
    if kind == "prior":
        model, x = DiffusionPrior(PRIOR, DiffusionConfig(target="x0")).eval(), torch.randn(3, 32)
        cond = {"text": torch.randint(0, 64, (3, 12)), "text_embed": F.normalize(torch.randn(3, 32), dim=-1)}
        with torch.no_grad():  # a trained model's null condition differs from zero: make it matter here
            model.null_text_embed.normal_()
    else:
        model, x = UnetDecoder(UNET, DiffusionConfig()).eval(), torch.randn(3, 3, 16, 16)
        cond = {"image_embed": F.normalize(torch.randn(3, 32), dim=-1)}
        with torch.no_grad():
            model.null_image_embed.normal_()
            for p in model.parameters():  # zero-initialised output layers would hide any difference
                p.add_(torch.randn_like(p) * 0.05)
    t = torch.tensor([3, 400, 999])
    with torch.no_grad():
        c = conditional(model, cond)(x, t)
        u = model(x, t, cond, torch.ones(3, dtype=torch.bool))
        assert (c - u).abs().max() > 1e-3
        assert torch.allclose(guided(model, cond, 1.0)(x, t), c, atol=1e-5)
        assert torch.allclose(guided(model, cond, 3.0)(x, t), u + 3 * (c - u), atol=1e-4)
    rows = []  # scale 1 is the conditional forward alone: no unconditional rows to pay for
    counting = lambda x, t, cond, drop: rows.append((len(x), int(drop.sum()))) or model(x, t, cond, drop)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(guided(counting, cond, 1.0)(x, t), c)
        guided(counting, cond, 3.0)(x, t)
    assert rows == [(3, 0), (6, 3)]


# ------------------------------------------------------------------------------------------------
# the models learn
# ------------------------------------------------------------------------------------------------

def prior_that_overfits(opt_for=lambda model: torch.optim.AdamW(model.parameters(), lr=3e-3)):
    """The tiny prior trained 60 steps on four (caption, embedding) pairs: each sampled embedding must come out
    within cosine 0.9 of its own."""
    torch.manual_seed(0)
    model = DiffusionPrior(PriorConfig(**{**asdict(PRIOR), "text_drop_prob": 0.0}), DiffusionConfig(target="x0"))
    text = torch.randint(0, 64, (4, 12))
    text_embed, image_embed = F.normalize(torch.randn(4, 32), dim=-1), F.normalize(torch.randn(4, 32), dim=-1)
    opt = opt_for(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss, _ = model.loss(text.repeat(4, 1), text_embed.repeat(4, 1), image_embed.repeat(4, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    z = model.sample(text, text_embed, steps=16, generator=torch.Generator().manual_seed(0))
    cos = F.cosine_similarity(z, image_embed, dim=-1)
    assert cos.min() > 0.9, cos  # the random image embeddings are near-orthogonal to each other
    assert torch.allclose(z.norm(dim=-1), torch.ones(4))
    return model


def test_prior_overfits_a_handful_of_embeddings():
    prior_that_overfits()


def test_prior_trains_its_hidden_matrices_with_muon(deepspeed_newton_schulz):
    """--optimizer muon on the prior: Muon takes every transformer block's attention and MLP matrices, AdamW the
    embeddings, projections, output head, norms and biases; it overfits the same pairs as with AdamW."""
    from dalle_ar.config import TrainConfig
    from dalle_ar.engine.optim import build_optimizer

    model = DiffusionPrior(PRIOR, DiffusionConfig())
    hidden = {id(p) for p in model.muon_params()}
    for block in model.blocks:
        assert {id(p) for p in block.parameters() if p.ndim == 2} <= hidden
    outside = [model.token_embed.weight, model.text_embed_proj.weight, model.image_embed_proj.weight, model.out.weight,
               *model.time_mlp.parameters(), model.pos_embed, model.query]
    assert hidden and hidden.isdisjoint(id(p) for p in outside)
    cfg = TrainConfig(optimizer="muon", zero_stage=0, grad_clip=0.0, lr=3e-3, muon_lr=0.02, weight_decay=0.0)
    prior_that_overfits(lambda model: build_optimizer(model, cfg))


def overfit_decoder(model: UnetDecoder, opt: torch.optim.Optimizer) -> tuple[float, float]:
    """The decoder's loss on two images (a red square, a blue half) under fixed noise, before and after 25 steps
    of `opt` on them."""
    images = torch.zeros(2, 3, 16, 16)
    images[0, 0, 4:12, 4:12] = 1  # a red square
    images[1, 2, :, 8:] = 1       # a blue half
    embeds = F.normalize(torch.randn(2, 32), dim=-1)

    def fixed_loss():
        with torch.no_grad():
            return model.loss(images.repeat(16, 1, 1, 1), embeds.repeat(16, 1), generator=torch.Generator().manual_seed(9))[0].item()

    before = fixed_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss, _ = model.loss(images.repeat(4, 1, 1, 1), embeds.repeat(4, 1), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, fixed_loss()


def test_decoder_overfits_a_few_images():
    torch.manual_seed(0)
    model = UnetDecoder(UnetConfig(**{**asdict(UNET), "image_embed_drop": 0.0}), DiffusionConfig())
    before, after = overfit_decoder(model, torch.optim.AdamW(model.parameters(), lr=3e-3))
    assert after < 0.35 * before, (before, after)  # measured: 0.17 after 30 steps


def test_decoder_trains_its_hidden_weights_with_muon(deepspeed_newton_schulz):
    """--optimizer muon on the decoder (ZeRO stage 0): Muon takes the residual blocks' and attention blocks' kernels
    in the down, middle and up paths (each kernel as an (out, in*k*k) matrix); the pixel-facing convs and the
    timestep embedding stay with AdamW; and the model overfits the same images as with AdamW."""
    from dalle_ar.config import TrainConfig
    from dalle_ar.engine.optim import build_optimizer
    from dalle_ar.unclip.decoder import ResBlock

    torch.manual_seed(0)
    model = UnetDecoder(UnetConfig(**{**asdict(UNET), "image_embed_drop": 0.0}), DiffusionConfig())
    hidden = {id(p) for p in model.muon_params()}
    blocks = [m for m in model.modules() if isinstance(m, (ResBlock, AttentionBlock))]
    assert len(blocks) >= 6 and all(p.ndim >= 2 for p in model.muon_params())
    for block in blocks:
        kernels = ([block.in_layers[-1].weight, block.out_layers[-1].weight] if isinstance(block, ResBlock)
                   else [block.qkv.weight, block.proj.weight])
        assert all(id(k) in hidden for k in kernels), type(block).__name__
    outside = [model.input_conv.weight, model.out[-1].weight, *model.time_embed.parameters()]
    assert hidden.isdisjoint(id(p) for p in outside)

    opt = build_optimizer(model, TrainConfig(optimizer="muon", zero_stage=0, grad_clip=0.0, lr=3e-3, muon_lr=0.02,
                                             weight_decay=0.0))
    before, after = overfit_decoder(model, opt)
    assert after < 0.35 * before, (before, after)


def test_attention_position_table_tells_every_pixel_where_it_is():
    table = sin_cos_2d(16, 8)
    assert table.shape == (16, 64) and table.abs().max() <= 1
    assert len({tuple(col.round(decimals=5).tolist()) for col in table.T}) == 64  # no two pixels share a code
    # a uniform feature map stays uniform through attention without the table: nothing says where a pixel is, so
    # "top left" in the caption cannot pick pixels; with it, the pixels differ
    torch.manual_seed(0)
    x = torch.ones(1, 16, 8, 8) + torch.randn(1, 16, 1, 1)
    context = torch.randn(1, 3, 24)
    for side, uniform in ((0, True), (8, False)):
        block = AttentionBlock(16, 8, context_dim=24, side=side)
        torch.nn.init.normal_(block.proj.weight)  # the residual branch starts at zero (ADM); open it
        out = block(x, context)
        assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-5) == uniform


def test_decoder_position_table_is_fixed_and_keeps_exports_loadable():
    plain = UnetDecoder(UNET, DiffusionConfig())
    with_pos = UnetDecoder(UnetConfig(**{**asdict(UNET), "attention_pos_embed": "sin_cos_2d"}), DiffusionConfig())
    assert plain.state_dict().keys() == with_pos.state_dict().keys()  # not saved: computed from the config
    with_pos.load_state_dict(plain.state_dict())
    assert UnetConfig(**{k: v for k, v in asdict(UNET).items() if k != "attention_pos_embed"}).attention_pos_embed == "none"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    cond = {"image_embed": F.normalize(torch.randn(2, 32), dim=-1)}
    assert with_pos(x, t, cond).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="run the decoder at its configured image_size"):
        with_pos(torch.randn(1, 3, 32, 32), t[:1], {"image_embed": cond["image_embed"][:1]})


def test_upsampler_conditions_on_a_blurred_low_res_image():
    model = UnetDecoder(UnetConfig(**{**asdict(UNET), "image_size": 16, "low_res_size": 8, "embed_dim": 0}), DiffusionConfig())
    images = torch.rand(2, 3, 16, 16)
    low = model.low_res_condition(images, torch.Generator().manual_seed(0))
    sharp = model.low_res_condition(images, blur=False)
    assert low.shape == (2, 3, 8, 8) and not torch.allclose(low, sharp) and low.std() < sharp.std()
    loss, _ = model.loss(images)
    loss.backward()
    out = model.sample(low_res=torch.rand(2, 3, 8, 8), steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_residual_upsampler_diffuses_the_difference_from_its_resized_input():
    up = dict(asdict(UNET), image_size=16, low_res_size=8, embed_dim=0)
    model = UnetDecoder(UnetConfig(**{**up, "low_res_residual": True}), DiffusionConfig(target="x0"))
    images = torch.rand(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    (x_t, t, cond, _), (x0, *_) = model.training_inputs(images, generator=g)
    resized = F.interpolate(cond["low_res"], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(x0, images * 2 - 1 - resized)  # the training target is the residual
    assert model.diffusion.clip_x0 == 2.0  # a residual spans [-2, 2]
    # a network that predicts a zero residual returns the resized input itself; the plain upsampler, mid-grey
    low = torch.rand(2, 3, 8, 8)
    model.out[-1].bias.data.zero_()  # the output conv is zero-initialised: x0 = 0 at every step
    out = model.sample(low_res=low, steps=4, generator=torch.Generator().manual_seed(0))
    expected = (F.interpolate(model.condition(low_res=low)["low_res"], size=(16, 16), mode="bilinear",
                              align_corners=False) + 1) / 2
    assert torch.allclose(out, expected.clamp(0, 1), atol=1e-5)
    plain = UnetDecoder(UnetConfig(**up), DiffusionConfig(target="x0"))
    assert torch.allclose(plain.sample(low_res=low, steps=4, generator=torch.Generator().manual_seed(0)),
                          torch.full_like(out, 0.5), atol=1e-5)
    with pytest.raises(ValueError, match="low_res_residual is for upsamplers"):
        UnetDecoder(UnetConfig(**{**asdict(UNET), "low_res_residual": True}), DiffusionConfig())
    # exports written before the option load as the paper's plain upsampler
    assert UnetConfig(**{k: v for k, v in up.items() if k != "low_res_residual"}).low_res_residual is False


def test_slerp_endpoints_and_unit_norm():
    a, b = F.normalize(torch.randn(3, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    assert torch.allclose(slerp(a, b, 0.3).norm(dim=-1), torch.ones(3), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# scripts on tiny data: precompute -> train_prior / train_decoder -> pipeline
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(shapes_shards, tmp_path_factory):
    """An (untrained) tiny CLIP export, a BPE tokenizer and the shards' embeddings."""
    d = tmp_path_factory.mktemp("unclip")
    torch.manual_seed(0)
    clip = save_pretrained(build_clip(CLIP), d / "clip", clip_export_config(CLIP), export_files(CLIP, d / "oc"))
    tok = TextTokenizer(train_bpe(read.captions(str(shapes_shards)), vocab_size=300), 12)
    tok.save(d / "tokenizer" / "tokenizer.json")
    precompute(["--clip", str(clip), "--data", str(shapes_shards), "--out", str(d / "emb"), "--num_workers", "0",
                "--batch_size", "64"])
    return {"dir": d, "clip": clip, "tokenizer": d / "tokenizer", "emb": d / "emb", "shards": shapes_shards}


def test_precompute_writes_clip_embeddings_and_resumes(world, tmp_path, capsys):
    meta = json.loads((world["emb"] / "meta.json").read_text())
    assert meta["num_samples"] == 300 and meta["embed_dim"] == 32 and meta["num_shards"] == 3
    zi, zt, captions, keys = next(iter(embedding_dataset(str(world["emb"])).batched(5)))
    images, captions2, keys2 = next(iter(read.image_text_dataset(str(world["shards"]), 64).batched(5)))
    scorer = ClipScorer.load(str(world["clip"]))
    assert list(keys) == list(keys2) and list(captions) == list(captions2)
    assert torch.allclose(zi, scorer.encode_images(images), atol=1e-5)
    assert torch.allclose(zt, scorer.encode_texts(captions), atol=1e-5)
    # a crash after the first shard: only the other two are computed again, to identical bytes
    out = tmp_path / "emb"
    shutil.copytree(world["emb"], out)
    for name in ("000001", "000002"):
        (out / f"{name}.tar").unlink()
        (out / "progress" / f"{name}.json").unlink()
    capsys.readouterr()
    precompute(["--clip", str(world["clip"]), "--data", str(world["shards"]), "--out", str(out), "--num_workers", "0"])
    assert "1 of 3 shards already embedded" in capsys.readouterr().out
    for name in ("000000", "000001", "000002"):
        assert (out / f"{name}.tar").read_bytes() == (world["emb"] / f"{name}.tar").read_bytes()


@pytest.fixture(scope="module")
def prior_run(world):
    out = world["dir"] / "prior"
    train_prior(["--data", str(world["emb"]), "--tokenizer", str(world["tokenizer"]), "--out", str(out),
                 "--steps", "40", "--batch_size", "32", "--lr", "2e-3", "--warmup_steps", "5", "--ema_decay", "0.9",
                 "--dim", "64", "--depth", "2", "--text_len", "12", "--sample_every", "20", "--eval_samples", "32",
                 "--eval_steps", "8", *QUIET])
    return out


def test_prior_script_moves_sampled_embeddings_towards_the_true_ones(prior_run):
    ev = json.loads((prior_run / "eval.json").read_text())
    start, end = ev["history"][0]["cosine"], ev["export_cosine"]
    assert [h["step"] for h in ev["history"]] == [0, 20]
    assert end > start + 0.3 and end > 0.6, ev
    config = json.loads((prior_run / "export" / "config.json").read_text())
    assert config["prior"]["embed_scale"] == pytest.approx(32 ** 0.5)  # the scale travels with the weights


def test_export_holds_the_ema_weights(prior_run):
    """Sampling loads <out>/export: the EMA average from the checkpoint, not the last raw weights."""
    exported, _ = models.load(prior_run / "export")
    tag = (prior_run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(prior_run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    raw, ema = state["module"], state["ema"]
    name = "out.weight"
    assert torch.equal(exported.state_dict()[name], ema[name].float())
    assert not torch.allclose(ema[name].float(), raw[name].float())


@pytest.fixture(scope="module")
def decoder_run(world):
    out = world["dir"] / "decoder"
    train_decoder(["--data", str(world["shards"]), "--embeddings", str(world["emb"]), "--out", str(out),
                   "--steps", "3", "--batch_size", "4", "--image_size", "16", "--channels", "16", "--channel_mult", "1,2",
                   "--num_res_blocks", "1", "--use_caption", "--tokenizer", str(world["tokenizer"]),
                   "--text_len", "12", "--sample_steps", "2", "--num_samples", "2", *QUIET])
    return out


def test_decoder_script_exports_and_writes_sample_grids(decoder_run):
    config = json.loads((decoder_run / "export" / "config.json").read_text())
    assert config["unet"]["embed_dim"] == 32 and config["unet"]["use_caption"] and config["stage"] == "base"
    assert (decoder_run / "export" / "tokenizer.json").exists()
    assert (decoder_run / "samples" / "step_00000003.png").exists()


def test_upsampler_script_trains_a_residual_upsampler_by_default(world, tmp_path):
    """train_decoder.py --stage upsampler: exports an upsampler diffusing the residual over its input unless told
    --no-low_res_residual (the paper's); the base decoder refuses the upsampler's flags."""
    from dalle_ar.config import ConfigError

    common = ["--stage", "upsampler", "--data", str(world["shards"]), "--low_res_size", "8", "--image_size", "16",
              "--channels", "16", "--channel_mult", "1,2", "--num_res_blocks", "1", "--batch_size", "4", *QUIET]
    train_decoder([*common, "--out", str(tmp_path / "up"), "--steps", "2", "--sample_steps", "2", "--num_samples", "2"])
    config = json.loads((tmp_path / "up" / "export" / "config.json").read_text())
    assert config["stage"] == "upsampler" and config["unet"]["low_res_residual"] is True
    assert config["unet"]["embed_dim"] == 0 and (tmp_path / "up" / "samples" / "step_00000002.png").exists()
    train_decoder([*common, "--out", str(tmp_path / "plain"), "--no-low_res_residual", "--dry_run", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["export_config"]["unet"]["low_res_residual"] is False
    with pytest.raises(ConfigError, match="--low_res_residual are for --stage upsampler"):
        train_decoder(["--data", str(world["shards"]), "--embeddings", str(world["emb"]), "--out", str(tmp_path / "b"),
                       "--low_res_residual", *QUIET])


def test_pipeline_generates_and_edits_deterministically(world, prior_run, decoder_run, tmp_path):
    up_cfg = UnetConfig(**{**asdict(UNET), "image_size": 32, "low_res_size": 16, "embed_dim": 0})
    upsampler = UnetDecoder(up_cfg, DiffusionConfig())
    save_pretrained(upsampler, tmp_path / "up", upsampler.export_config(stage="upsampler"))
    pipe = UnclipPipeline.load(prior_run / "export", decoder_run / "export", device="cpu", upsampler_dir=tmp_path / "up")
    kw = dict(seed=3, prior_steps=4, decoder_steps=3, prior_guidance=2.0, decoder_guidance=3.0, batch_size=3)
    a = pipe.generate(["a red circle", "a blue square"], 2, **kw)
    assert a.shape == (2, 2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    # the caption alone (the decoder's null image embedding): its own images, the same for the same seed
    bare = UnclipPipeline.load(prior_run / "export", decoder_run / "export", device="cpu")
    kw_decode = dict(steps=2, guidance=2.0)
    alone = [bare.decode(None, ["a red circle"] * 2, **kw_decode, generator=torch.Generator().manual_seed(0))
             for _ in range(2)]
    assert alone[0].shape == (2, 3, 16, 16) and torch.equal(*alone)
    z = bare.image_embed(torch.rand(2, 3, 32, 32))
    assert not torch.equal(alone[0], bare.decode(z, ["a red circle"] * 2, **kw_decode,
                                                 generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="captions"):
        bare.decode(None, None, steps=2, guidance=1.0, generator=torch.Generator())
    assert torch.equal(a, pipe.generate(["a red circle", "a blue square"], 2, **kw))
    assert not torch.equal(a, pipe.generate(["a red circle", "a blue square"], 2, **{**kw, "seed": 4}))
    base = ["--prior", str(prior_run / "export"), "--decoder", str(decoder_run / "export"), "--out", str(tmp_path / "e"),
            "--decoder_steps", "2"]
    unclip_edit([*base, "variations", "--synthetic", "0", "--n", "2"])
    unclip_edit([*base, "interpolate", "--synthetic", "0", "--synthetic", "1", "--steps", "2"])
    unclip_edit([*base, "text_diff", "--synthetic", "0", "--from", "a red circle", "--to", "a blue circle", "--steps", "2"])
    for op, n in (("variations", 2), ("interpolate", 2), ("text_diff", 2)):
        assert (tmp_path / "e" / f"{op}.png").exists()
        assert len(json.loads((tmp_path / "e" / f"{op}.json").read_text())["cosine_to_input"]) == n
    with pytest.raises(FileNotFoundError, match="interpolate takes 2"):
        unclip_edit([*base, "interpolate", "--synthetic", "0"])


def test_generate_script_with_the_unclip_backend(world, prior_run, decoder_run, tmp_path):
    """sample/generate.py --backend unclip: the AR backend's outputs (grids, rank PNGs, scores.json with CLIP
    scores and the shapes check), from the prior + decoder exports."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "sample"))
    from generate import main as generate

    out = tmp_path / "gen"
    report = generate(["--backend", "unclip", "--prior", str(prior_run / "export"), "--decoder", str(decoder_run / "export"),
                       "--clip", str(world["clip"]), "--synthetic_prompts", "2", "--num_candidates", "3",
                       "--top_k_rerank", "2", "--prior-steps", "3", "--decoder-steps", "2", "--decoder-guidance", "2",
                       "--batch_size", "3", "--out", str(out), "--no-progress"])
    assert report["settings"]["backend"] == "unclip" and report["summary"]["num_candidates"] == 3
    assert all(len(r["clip_score"]) == 3 and len(r["check"]) == 3 for r in report["prompts"])
    assert (out / "grid.png").exists() and (out / "prompts" / "001" / "rank_01.png").exists()
    with pytest.raises(SystemExit):  # likelihood ranking is the transformer's
        generate(["--backend", "unclip", "--prior", "p", "--decoder", "d", "--rank-by", "likelihood", "--prompt", "x"])


def test_unclip_accuracy_bench_splits_prior_and_decoder(prior_run, decoder_run, tmp_path):
    """bench/unclip_accuracy.py: caption accuracy of text -> prior -> decoder, of the decoder alone from the renders'
    own embeddings and from the caption alone, by number of objects, at the world's 64 px (the 16 px decoder's
    images are resized)."""
    from bench.unclip_accuracy import main as unclip_accuracy

    r = unclip_accuracy(["--prior", str(prior_run / "export"), "--decoder", str(decoder_run / "export"), "--prompts", "3",
                         "--candidates", "2", "--guidance", "1,2", "--text_guidance", "4", "--steps", "2",
                         "--grid", str(tmp_path / "g.png"), "--out", str(tmp_path / "r.json")])
    assert r["image_size"] == 16 and r["resized"] and r["checked_at"] == 64
    assert r["decoder_config"]["image_size"] == 16 and r["decoder_config"]["attention_pos_embed"] == "none"
    assert list(r["text"]) == list(r["decoder_only"]) == ["g=1", "g=2", "g=1,gt=4", "g=2,gt=4"]
    assert list(r["caption_only"]) == ["g=1", "g=2"]  # the caption alone: no image embedding to guide apart
    for part in ("text", "decoder_only", "caption_only"):
        s = r[part]["g=2"]
        assert s["candidates"] == 6 and 0 <= s["per_candidate"] <= s["oracle"] <= 1
        assert sum(b["prompts"] for b in s["by_objects"].values()) == 3
    assert set(r["text"]["g=1"]["top1"]) == {"clip", "sampling"}
    assert -1 <= r["prior_cos"] <= 1 and (tmp_path / "g.png").stat().st_size > 500
    assert 0 <= r["text"]["g=2"]["background_tint"]["mean"] <= r["text"]["g=2"]["background_tint"]["max"]
    assert "upsampler_alone" not in r


def test_unclip_accuracy_bench_scores_the_upsampler_alone_and_background_tint(prior_run, decoder_run, tmp_path):
    """With --upsampler the bench also upsamples the renders shrunk to the upsampler's input, beside their bilinear
    resize; the background tint is 0 for a render and the shift's length for a uniformly shifted one."""
    import numpy as np

    from bench.unclip_accuracy import background_tint, main as unclip_accuracy
    from dalle_ar.data import synthetic

    render = torch.from_numpy(np.array(synthetic.heldout(1)[0][0])).permute(2, 0, 1).float() / 255
    shifted = (render + torch.tensor([3.0, 4.0, 0.0])[:, None, None] / 255)
    assert background_tint(torch.stack([render, shifted])) == pytest.approx([0.0, 5.0], abs=1e-3)
    up_cfg = UnetConfig(**{**asdict(UNET), "image_size": 32, "low_res_size": 16, "embed_dim": 0, "low_res_residual": True})
    upsampler = UnetDecoder(up_cfg, DiffusionConfig(target="v"))
    save_pretrained(upsampler, tmp_path / "up", upsampler.export_config(stage="upsampler"))
    r = unclip_accuracy(["--prior", str(prior_run / "export"), "--decoder", str(decoder_run / "export"), "--upsampler",
                         str(tmp_path / "up"), "--prompts", "3", "--candidates", "1", "--guidance", "2", "--steps", "2",
                         "--no_progress", "--out", str(tmp_path / "r.json")])
    alone = r["upsampler_alone"]
    assert r["image_size"] == 32 and alone["input_size"] == 16 and alone["residual"] is True
    for part in ("upsampled", "bilinear"):
        assert alone[part]["candidates"] == 3 and alone[part]["psnr"] > 0
        assert 0 <= alone[part]["background_tint"]["mean"] <= alone[part]["background_tint"]["max"]
    # a resize keeps the flat background (up to blurred edges), and so does an untrained residual upsampler, which
    # starts from the resized input (an untrained plain one draws mid-grey: the decoder's tint here is ~150)
    assert alone["bilinear"]["background_tint"]["over_10"] == alone["upsampled"]["background_tint"]["over_10"] == 0
    assert json.loads((tmp_path / "r.json").read_text())["upsampler_alone"] == alone
    assert json.loads((tmp_path / "r.json").read_text())["prompts"] == 3
