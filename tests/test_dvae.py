import math

import numpy as np
import pytest
import torch

from dalle_ar.config import ConfigError, preset
from dalle_ar.data import synthetic
from dvae import DiscreteVAE
from dvae.config import DVAEConfig, DVAELossConfig
from dvae.loss import (codebook_usage, dvae_loss, kl_to_uniform, kl_weight, logit_laplace_nll, random_crop,
                       temperature)
from dvae.metrics import psnr, ssim
from dvae.model import Upsample2x, map_pixels, unmap_pixels


def images(n, seed=0):
    return torch.stack([torch.from_numpy(np.array(synthetic.make_example(i, seed=seed)[0])).permute(2, 0, 1)
                        for i in range(n)]).float() / 255


def test_tiny_and_paper_grids():
    tiny = DiscreteVAE(preset(DVAEConfig, "tiny"))
    x = torch.rand(2, 3, 64, 64)
    codes = tiny.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long and codes.max() < 512
    assert tiny.decode(codes).shape == (2, 3, 64, 64)
    assert tiny.decode(codes.flatten(1)).shape == (2, 3, 64, 64)
    stats, logits = tiny(x)
    assert stats.shape == (2, 6, 64, 64) and logits.shape == (2, 512, 8, 8)
    paper = preset(DVAEConfig, "paper")
    assert (paper.grid_size, paper.num_tokens, paper.n_hid, paper.n_blk_per_group) == (32, 8192, 256, 2)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        DiscreteVAE(DVAEConfig(image_size=60))


def test_openai_parameter_names_and_post_gain():
    model = DiscreteVAE(DVAEConfig(n_hid=16, n_blk_per_group=2))
    names = set(model.state_dict())
    for name in ("encoder.blocks.input.w", "encoder.blocks.group_1.block_2.res_path.conv_4.b",
                 "encoder.blocks.group_2.block_1.id_path.w", "encoder.blocks.output.conv.w",
                 "decoder.blocks.input.w", "decoder.blocks.group_4.block_1.res_path.conv_1.w",
                 "decoder.blocks.output.conv.b"):
        assert name in names
    assert model.decoder.blocks.output.conv.w.shape[0] == 6  # logit-Laplace location + log-scale per channel
    assert model.encoder.blocks.group_1.block_1.post_gain == 1 / 8 ** 2  # 4 groups x 2 blocks


def test_map_unmap_pixels():
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    assert torch.allclose(map_pixels(x).flatten(), torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(x)), x)


def test_logit_laplace_against_hand_computed_values():
    stats = torch.tensor([1.0, 2.0, 0.0, 0.0, math.log(0.5), 0.0]).view(1, 6, 1, 1)
    x = torch.tensor([0.5, 1.0, 0.0]).view(1, 3, 1, 1)
    nll = logit_laplace_nll(stats, x).flatten()
    # x=0.5 -> y=0.5, logit 0, mu 1, b 1:    |0-1|/1 + ln 1 + ln 2 + ln .5 + ln .5
    assert nll[0].item() == pytest.approx(1 + math.log(2) + 2 * math.log(0.5), abs=1e-5)
    # x=1 -> y=0.9, logit ln 9, mu 2, b .5:  |ln9-2|/.5 + ln .5 + ln 2 + ln .9 + ln .1
    assert nll[1].item() == pytest.approx(abs(math.log(9) - 2) / 0.5 + math.log(0.9) + math.log(0.1), abs=1e-5)
    # x=0 -> y=0.1, logit -ln 9, mu 0, b 1
    assert nll[2].item() == pytest.approx(math.log(9) + math.log(2) + math.log(0.1) + math.log(0.9), abs=1e-5)


def test_logit_laplace_is_a_density_on_the_unit_interval():
    """exp(-nll) integrates to 1 over y in (0, 1) (x = unmap(y) spans a wider range, so integrate in y)."""
    y = torch.linspace(1e-6, 1 - 1e-6, 400001, dtype=torch.float64)
    mu, b = 0.7, 0.3
    density = torch.exp(-(torch.logit(y) - mu).abs() / b) / (2 * b * y * (1 - y))
    assert torch.trapezoid(density, y).item() == pytest.approx(1.0, abs=1e-3)
    # and our function is that density's negative log at y = map_pixels(x)
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 0.99
    stats = torch.cat([torch.full_like(x, mu), torch.full_like(x, math.log(b))], dim=1)
    yy = map_pixels(x)
    expected = -torch.log(torch.exp(-(torch.logit(yy) - mu).abs() / b) / (2 * b * yy * (1 - yy)))
    torch.testing.assert_close(logit_laplace_nll(stats, x).double(), expected, rtol=1e-4, atol=1e-4)


def test_kl_to_uniform_is_zero_for_uniform_and_log_k_for_one_hot():
    assert kl_to_uniform(torch.zeros(2, 16, 3, 3)).abs().max().item() < 1e-6
    one_hot = torch.full((1, 16, 1, 1), -1e4)
    one_hot[0, 3] = 0
    assert abs(kl_to_uniform(one_hot).item() - np.log(16)) < 1e-4


def test_schedules_follow_the_paper_and_scale_to_the_run():
    cfg = DVAELossConfig()
    assert (cfg.kl_weight, cfg.kl_anneal_steps, cfg.temperature_anneal_steps, cfg.lr_anneal_steps) == (6.6, 5000, 150_000, 1_200_000)
    assert temperature(0, cfg) == 1.0 and temperature(150_000, cfg) == pytest.approx(1 / 16)
    assert temperature(75_000, cfg) == pytest.approx((1 + 1 / 16) / 2)  # cosine: halfway at the midpoint
    assert temperature(37_500, cfg) == pytest.approx(1 / 16 + (1 - 1 / 16) * (1 + math.cos(math.pi / 4)) / 2)
    assert temperature(10 ** 7, cfg) == pytest.approx(1 / 16)  # constant after the anneal
    assert kl_weight(0, cfg) == 0.0 and kl_weight(5000, cfg) == pytest.approx(6.6) and kl_weight(2500, cfg) == pytest.approx(3.3)
    short = cfg.scaled(30_000)  # a 1% run: every anneal 1% as long
    assert (short.kl_anneal_steps, short.temperature_anneal_steps, short.lr_anneal_steps) == (50, 1500, 12_000)
    assert DVAELossConfig(reference_steps=0).scaled(10) == DVAELossConfig(reference_steps=0)


def test_kl_term_is_weighted_beta_over_pixels_per_cell():
    """Paper A.2: the loss is divided by H*W*3, so KL summed over the grid gets weight beta / 192 at 8x downsampling."""
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    x = images(4)
    cfg = DVAELossConfig(reference_steps=0, kl_anneal_steps=1)
    torch.manual_seed(1)
    with_kl, m = dvae_loss(model, x, 10, cfg)
    torch.manual_seed(1)
    without, _ = dvae_loss(model, x, 10, DVAELossConfig(reference_steps=0, kl_weight=0.0))
    assert (with_kl - without).item() == pytest.approx(6.6 / 192 * m["kl_per_cell"], rel=1e-4)


def test_crop_training_uses_grid_aligned_windows_and_checks_its_size():
    """--crop_size: the loss sees one random crop whose corner sits on the 8 px grid; sizes that cut cells or exceed
    the image are refused with the fix."""
    x = torch.arange(64.0).repeat(64, 1)[None, None].expand(2, 3, 64, 64)  # pixel value = its column
    torch.manual_seed(0)
    corners = set()
    for _ in range(40):
        crop = random_crop(x, 32, 8)
        assert crop.shape == (2, 3, 32, 32)
        corners.add(int(crop[0, 0, 0, 0]))
    assert corners <= {0, 8, 16, 24, 32} and len(corners) > 2
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    loss, m = dvae_loss(model, images(4), 0, DVAELossConfig(reference_steps=0, crop_size=32))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters()) and 0 < m["recon_mse"] < 1
    tiny = preset(DVAEConfig, "tiny")
    DVAELossConfig(crop_size=32).check_model(tiny)
    for bad, fix in ((20, "--crop_size 16"), (96, "--crop_size 64")):
        with pytest.raises(ConfigError, match=fix):
            DVAELossConfig(crop_size=bad).check_model(tiny)


def test_encoder_runs_channels_last_and_gives_the_codes_of_the_nchw_layout():
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny")).eval()
    x = images(8)
    layouts = []
    hook = model.encoder.blocks.input.register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        codes = model.encode(x)
    hook.remove()
    assert layouts == [True]  # what makes train/encode.py 1.5x faster on CPU
    with torch.no_grad():
        nchw = model.encoder(map_pixels(x).contiguous()).argmax(dim=1)
    assert torch.equal(codes, nchw)


def test_decoder_upsamples_as_torchs_nearest_upsample_bit_for_bit():
    """The decoder's faster CPU upsampling gives the reconstructions and gradients of `nn.Upsample`, so training
    gives the same weights."""
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    z = torch.softmax(torch.randn(4, model.config.num_tokens, 4, 4), dim=1)

    def run():
        model.zero_grad()
        out = model.decoder(z)
        out.square().mean().backward()
        return out, [p.grad.clone() for p in model.decoder.parameters()]

    fast, fast_grads = run()
    ups = [name for name, m in model.decoder.named_modules() if isinstance(m, Upsample2x)]
    assert len(ups) == model.config.group_count - 1
    for name in ups:
        model.decoder.get_submodule(name.rsplit(".", 1)[0]).upsample = torch.nn.Upsample(scale_factor=2, mode="nearest")
    ref, ref_grads = run()
    assert torch.equal(fast, ref)
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, ref_grads))
    for dtype in (torch.float32, torch.bfloat16):  # odd sizes, and the bf16 of autocast
        x = torch.randn(2, 3, 5, 7, dtype=dtype, requires_grad=True)
        y = Upsample2x()(x)
        assert type(y.grad_fn).__name__ == "_NearestUpsample2xBackward"
        g = torch.randn_like(y)
        ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        assert torch.equal(y, ref)
        assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    y = Upsample2x()(torch.randn(1, 2, 3, 3, requires_grad=True))
    torch.relu_(y).sum().backward()  # its output takes in-place ops, as any layer's


def test_codebook_usage_and_perplexity():
    used, ppl = codebook_usage(torch.tensor([[0, 0], [1, 1]]), num_tokens=4)
    assert used == 0.5 and ppl == pytest.approx(2.0)
    used, ppl = codebook_usage(torch.arange(8), num_tokens=8)
    assert used == 1.0 and ppl == pytest.approx(8.0)
    used, ppl = codebook_usage(torch.tensor([0, 0, 0, 1]), num_tokens=8)
    assert ppl == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_psnr_and_ssim_against_hand_computed_values():
    a, b = torch.zeros(1, 3, 16, 16), torch.full((1, 3, 16, 16), 0.1)
    assert psnr(a, b).item() == pytest.approx(20.0, abs=1e-4)
    x = torch.rand(2, 3, 32, 32)
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # constant images: contrast/structure term is c2/c2 = 1, luminance (2ab + c1) / (a^2 + b^2 + c1)
    c1 = 0.01 ** 2
    p, q = torch.full((1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.6)
    assert ssim(p, q).item() == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3 ** 2 + 0.6 ** 2 + c1), abs=1e-4)
    noisy = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    assert (ssim(x, noisy) < 0.9).all() and torch.allclose(ssim(x, noisy), ssim(noisy, x), atol=1e-6)


@pytest.mark.parametrize("reconstruction", ["logit_laplace", "mse"])
def test_overfits_16_images(reconstruction):
    """Reconstruction error with the model's own training relaxation falls at least 3x in 150 steps (the temperature
    anneal's length). Measured on 2-core CPUs: logit-Laplace 3.8x-4.2x at 150 steps, then a plateau near 4x (3.9x at
    250 with channels_last activations), so the bound leaves room for floating-point differences between machines."""
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    cfg = DVAELossConfig(reconstruction=reconstruction, reference_steps=0, kl_weight=0.0, temperature_anneal_steps=150)
    x = images(16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    errors = []
    for step in range(150):
        loss, m = dvae_loss(model, x, step, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append(m["recon_mse"])
    assert np.mean(errors[-5:]) * 3 < np.mean(errors[:3]), (errors[:3], errors[-5:])


def test_muon_steps_hidden_conv_kernels_as_orthogonal_matrices_and_keeps_its_momentum(deepspeed_newton_schulz):
    """--optimizer muon on the dVAE (ZeRO stage 0): each residual block's kernel (out, in, k, k) moves by its momentum
    orthogonalised as an (out, in*k*k) matrix (given full-rank gradients, every singular value of the update near 1,
    x sqrt(rows/cols) for a tall one), while the pixel-facing convs, the code logits and the code embedding train with
    AdamW; the kernels' momentum is in the optimizer's state, so a resumed run steps as a straight one. ZeRO 1/2 are
    refused by name (DeepSpeed's partitioned Muon takes matrices only). On CPU the fp32 iteration in DeepSpeed's place."""
    from dalle_ar.config import TrainConfig
    from dalle_ar.engine.optim import build_optimizer

    lr = 1e-2
    cfg = TrainConfig(optimizer="muon", zero_stage=0, grad_clip=0.0, lr=lr, muon_lr=lr, weight_decay=0.0)
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    kernels = model.muon_params()
    assert len(kernels) == 2 * (4 * 4 + 3)  # 2 halves x (4 groups of one block of 4 convs + 3 shortcut convs)
    pixel_and_code_convs = [c.w for half in (model.encoder, model.decoder) for c in (half.blocks.input, half.blocks.output.conv)]
    assert {id(k) for k in kernels}.isdisjoint(id(w) for w in pixel_and_code_convs)
    opt = build_optimizer(model, cfg)
    before = [k.detach().clone() for k in kernels]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    for k, k0 in zip(kernels, before):
        sv = torch.linalg.svdvals((k0 - k.detach()).view(len(k), -1) / lr)
        scale = max(1, len(k) / k[0].numel()) ** 0.5
        assert sv.min() > 0.5 * scale and sv.max() < 1.25 * scale, (tuple(k.shape), sv / scale)

    loss_cfg = DVAELossConfig(reference_steps=0, kl_weight=0.0)
    x = images(8)

    def run(steps, start=0, model=None, opt_state=None):
        torch.manual_seed(0)
        model = model or DiscreteVAE(preset(DVAEConfig, "tiny"))
        opt = build_optimizer(model, cfg)
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        for step in range(start, steps):
            torch.manual_seed(step)  # the step's gumbel noise
            opt.zero_grad()
            dvae_loss(model, x, step, loss_cfg)[0].backward()
            opt.step()
        return model, opt

    straight, _ = run(4)
    half, opt = run(2)
    resumed, _ = run(4, 2, half, opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))

    with pytest.raises(ConfigError, match="--zero_stage 0"):
        build_optimizer(DiscreteVAE(preset(DVAEConfig, "tiny")),
                        TrainConfig(optimizer="muon", zero_stage=2, grad_clip=0.0, muon_momentum=0.0))


def test_compiled_muon_update_serves_every_kernel_size_with_a_few_graphs(deepspeed_newton_schulz):
    """The dVAE's Muon (muon_update compiled, the default) compiles one graph per kind of matrix (tall or wide, small
    or large), not one per kernel shape: the tiny dVAE's kernels come in more shapes than torch.compile's recompile
    limit, and every graph costs seconds of compiling on a machine's first run (the demo's dVAE compiled eight,
    20-30 s, before muon_update took dynamic shapes and plain 2-D tensors). The step moves every kernel."""
    from torch._dynamo.utils import counters

    from dalle_ar.config import TrainConfig
    from dalle_ar.engine.optim import build_optimizer

    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    shapes = {tuple(k.view(len(k), -1).shape) for k in model.muon_params()}
    kinds = {(rows > cols, rows * cols > 4096) for rows, cols in shapes}
    assert len(shapes) > torch._dynamo.config.recompile_limit and len(kinds) <= 4, (shapes, kinds)
    cfg = TrainConfig(optimizer="muon", zero_stage=0, grad_clip=0.0, lr=1e-2, muon_lr=1e-2, weight_decay=0.0)
    torch._dynamo.reset()
    counters.clear()
    opt = build_optimizer(model, cfg)
    before = [k.detach().clone() for k in model.muon_params()]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert 1 <= counters["stats"]["unique_graphs"] <= len(kinds), (counters["stats"], kinds)
    assert all(not torch.equal(k, k0) for k, k0 in zip(model.muon_params(), before))
