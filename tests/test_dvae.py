import numpy as np
import torch

from dalle_ar.config import DVAEConfig, preset
from dalle_ar.data import synthetic
from dvae import DiscreteVAE
from dvae.loss import dvae_loss, kl_to_uniform


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
    paper = preset(DVAEConfig, "paper")
    assert (paper.grid_size, paper.num_tokens) == (32, 8192)


def test_kl_to_uniform_is_zero_for_uniform_and_log_k_for_one_hot():
    assert kl_to_uniform(torch.zeros(2, 16, 3, 3)).item() < 1e-6
    one_hot = torch.full((1, 16, 1, 1), -1e4)
    one_hot[0, 3] = 0
    assert abs(kl_to_uniform(one_hot).item() - np.log(16)) < 1e-4


def test_overfits_16_images():
    """Reconstruction error with the model's own training relaxation falls at least 5x."""
    torch.manual_seed(0)
    model = DiscreteVAE(preset(DVAEConfig, "tiny"))
    x = images(16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    errors = []
    for step in range(150):
        loss, m = dvae_loss(model, x, step, anneal_steps=150, beta=0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        errors.append(m["recon_mse"])
    assert np.mean(errors[-5:]) * 5 < np.mean(errors[:3]), (errors[:3], errors[-5:])
