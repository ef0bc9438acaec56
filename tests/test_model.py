import json

import pytest
import torch

from dalle_ar.config import DalleConfig, preset
from dalle_ar.model import DalleTransformer
from bench.memory_plan import main as plan_main
from dalle_ar.model.plan import plan
from dalle_ar.sampling import filter_logits, generate_codes


def tiny(**kw) -> DalleTransformer:
    torch.manual_seed(0)
    return DalleTransformer(preset(DalleConfig, "tiny", dim=64, depth=2, heads=2, text_vocab_size=50, **kw))


def batch(model, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randint(0, cfg.num_text_tokens, (b, cfg.text_len), generator=g),
            torch.randint(0, cfg.num_image_tokens, (b, cfg.image_seq_len), generator=g))


def test_shapes_and_loss_weighting():
    model = tiny()
    text, codes = batch(model)
    text_logits, image_logits = model(text, codes)
    assert text_logits.shape == (4, 16, model.config.num_text_tokens)
    assert image_logits.shape == (4, 64, 512)
    loss, parts = model.loss(text, codes)
    assert loss.item() == pytest.approx(parts["text_loss"] / 8 + 7 * parts["image_loss"] / 8, rel=1e-5)


def test_causality_image_token_does_not_see_the_future():
    model = tiny().eval()
    text, codes = batch(model, b=1)
    _, a = model(text, codes)
    codes2 = codes.clone()
    codes2[0, 40:] = (codes2[0, 40:] + 1) % 512
    _, b = model(text, codes2)
    assert torch.allclose(a[0, :41], b[0, :41], atol=1e-5)  # logit j predicts token j from tokens < j
    assert not torch.allclose(a[0, 41:], b[0, 41:], atol=1e-3)


def test_overfits_a_batch():
    model = tiny()
    text, codes = batch(model, b=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, parts = model.loss(text, codes)
        first = first or parts["image_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 6.0 and parts["image_loss"] < 0.5, (first, parts)


@pytest.mark.parametrize("b", [1, 3])
def test_cached_logits_match_full_forward(b):
    model = tiny().eval()
    text, codes = batch(model, b=b)
    _, full = model(text, codes)
    sampled, cached = generate_codes(model, text, forced=codes, return_logits=True)
    assert torch.equal(sampled.flatten(1), codes)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


def test_chunked_prefill_matches_full_forward():
    """A multi-token chunk after a cached prefix (the masked SDPA path) equals the full forward."""
    model = tiny().eval()
    text, codes = batch(model, b=2)
    _, full = model(text, codes)
    cache = model.new_cache(2)
    model.prefill(text, cache)
    h = model.trunk(model.embed_image(codes[:, :10]), cache)
    assert torch.allclose(model.to_image_logits(h), full[:, 1:11], atol=1e-4)


def test_sampling_is_seeded_and_in_range():
    model = tiny().eval()
    text, _ = batch(model, b=2)
    a = generate_codes(model, text, generator=torch.Generator().manual_seed(1), top_k=20)
    b = generate_codes(model, text, generator=torch.Generator().manual_seed(1), top_k=20)
    c = generate_codes(model, text, generator=torch.Generator().manual_seed(2), top_k=20)
    assert a.shape == (2, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() < 512


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.9)).tolist() == [[False, False, False, True]]
    assert not torch.isinf(filter_logits(logits)).any()


def test_paper_preset_dimensions():
    cfg = preset(DalleConfig, "paper")
    assert (cfg.text_len, cfg.image_seq_len, cfg.num_image_tokens, cfg.num_text_tokens) == (256, 1024, 8192, 16384 + 256)
    with torch.device("meta"):
        model = DalleTransformer(cfg)
    assert 11e9 < model.num_params() < 13e9  # the paper's 12B


@pytest.mark.parametrize("name,target", [("base", 450e6), ("large", 1.3e9), ("paper", 12e9)])
def test_presets_build_on_meta_at_their_sizes(name, target):
    report = plan(preset(DalleConfig, name), world_size=8)
    assert abs(report["params"]["total"] - target) < 0.1 * target, report["params"]
    mem = report["memory"]["per_gpu"]
    assert mem["zero_3"]["total_gib"] < mem["zero_2"]["total_gib"] < mem["zero_1"]["total_gib"] < mem["zero_0"]["total_gib"]
    act = report["memory"]["activations"]
    assert act["with_checkpointing_gib"] < act["without_checkpointing_gib"]


def test_plan_cli_prints_json(capsys):
    plan_main(["--preset", "paper", "--world_size", "64"])
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["depth"] == 64 and report["memory"]["world_size"] == 64
    assert report["flops_per_token"] == 6 * report["params"]["non_embedding"] + 12 * 64 * 3968 * 1280


def test_caption_dropout_replaces_whole_captions_by_pads_in_training_only():
    model = tiny(null_cond_prob=0.3).train()
    text = torch.randint(0, 50, (4000, model.config.text_len))
    dropped = model.drop_captions(text)
    pads = torch.arange(model.config.text_len) + model.config.text_vocab_size
    is_pad = (dropped == pads).all(1)
    assert torch.equal(dropped[~is_pad], text[~is_pad]) and 0.27 < is_pad.float().mean() < 0.33
    assert torch.equal(model.eval().drop_captions(text), text)


def test_loss_feeds_dropped_captions_to_the_forward_it_is_given():
    model = tiny(null_cond_prob=0.5).train()
    text, codes = batch(model, b=16)
    seen = []
    args, target = model.training_inputs(text, codes)
    model.loss_from_output((lambda t, c: seen.append(t) or model(t, c))(*args), target)
    assert not torch.equal(seen[0], text)  # some captions dropped (seed 0), others kept
    assert (seen[0] == text).all(1).any()


def test_sandwich_norm_and_rotary_train():
    model = tiny(sandwich_norm=True, rotary=True, attention="row,conv")
    text, codes = batch(model)
    loss, _ = model.loss(text, codes)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].ln_attn_out.weight.grad is not None
