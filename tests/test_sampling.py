"""Sampling: static-cache decode vs the full forward, guidance, priming, inpainting, seeds, filters, likelihood."""

import pytest
import torch
import torch.nn.functional as F

from dalle_ar.config import DalleConfig
from dalle_ar.model import DalleTransformer
from dalle_ar.sampling import (border_mask, box_mask, filter_logits, generate_codes, guide, log_likelihood,
                               prime_mask, sample_token)

SIDE = 8


def tiny(**kw) -> DalleTransformer:
    torch.manual_seed(0)
    cfg = DalleConfig(text_vocab_size=40, text_len=6, num_image_tokens=48, image_fmap_size=SIDE, dim=32, depth=4,
                      heads=2, **kw)
    return DalleTransformer(cfg).eval()


def batch(model, b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    text = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_len), generator=g)
    codes = torch.randint(0, cfg.num_image_tokens, (b, cfg.image_seq_len), generator=g)
    return text, codes


def sample(model, text, seed=0, **kw):
    return generate_codes(model, text, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("attention,extra", [("full", {}), ("row", {}), ("column", {}), ("conv", {}),
                                             ("sparse", dict(rotary=True, sandwich_norm=True))])
def test_cached_logits_match_full_forward_at_every_position(attention, extra):
    """Every image position through the per-token static decode step equals the uncached forward."""
    model = tiny(attention=attention, **extra)
    text, codes = batch(model)
    with torch.no_grad():
        _, full = model(text, codes)
    _, cached = generate_codes(model, text, forced=codes, return_logits=True)
    assert cached.shape == full.shape
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


@pytest.mark.parametrize("attention", ["full", "row", "column", "conv"])
def test_priming_keeps_the_rows_and_equals_teacher_forcing(attention):
    """Primed rows go through the cache in one chunk; the rest is sampled token by token. The codes keep the
    prime exactly and every logit equals the full forward on the final codes (teacher forcing)."""
    model = tiny(attention=attention)
    text, image = batch(model)
    rows = 3
    codes, logits = sample(model, text, known_codes=image, known_mask=prime_mask(SIDE, rows), return_logits=True)
    codes = codes.flatten(1)
    assert torch.equal(codes[:, : rows * SIDE], image[:, : rows * SIDE])
    assert not torch.equal(codes, image)
    with torch.no_grad():
        _, full = model(text, codes)
    assert torch.allclose(logits, full, atol=1e-4), (logits - full).abs().max()


def test_guidance_scale_one_is_plain_sampling():
    model = tiny(attention="sparse")
    text, _ = batch(model)
    assert torch.equal(sample(model, text, cond_scale=1.0, temperature=0.9, top_k=20),
                       sample(model, text, temperature=0.9, top_k=20))


def test_guided_logits_are_uncond_plus_scale_times_difference():
    """cond and uncond rows batched in one cache of 2B rows give exactly the two separate forwards, combined."""
    model = tiny(attention="sparse")
    text, codes = batch(model)
    scale = 3.0
    _, guided = generate_codes(model, text, forced=codes, cond_scale=scale, return_logits=True)
    with torch.no_grad():
        _, cond = model(text, codes)
        _, uncond = model(model.null_text(len(text)), codes)
    assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-3)
    # and guidance changes what is sampled
    assert not torch.equal(sample(model, text, cond_scale=scale), sample(model, text))


def test_guided_priming_keeps_the_rows():
    model = tiny(attention="sparse")
    text, image = batch(model)
    codes, logits = sample(model, text, cond_scale=2.0, known_codes=image, known_mask=prime_mask(SIDE, 2),
                           return_logits=True)
    codes = codes.flatten(1)
    assert torch.equal(codes[:, : 2 * SIDE], image[:, : 2 * SIDE])
    with torch.no_grad():
        _, cond = model(text, codes)
        _, uncond = model(model.null_text(len(text)), codes)
    assert torch.allclose(logits, guide(torch.cat([cond, uncond]), 2.0), atol=1e-3)


def test_same_seed_same_codes_other_seed_other_codes():
    model = tiny(attention="sparse")
    text, _ = batch(model)
    a, b, c = sample(model, text, seed=5), sample(model, text, seed=5), sample(model, text, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, SIDE, SIDE) and a.dtype == torch.long


@pytest.mark.parametrize("known", [box_mask(SIDE, (2, 3, 6, 7)), box_mask(SIDE, (0.25, 0.375, 0.75, 0.875)),
                                   border_mask(SIDE, 2)])
def test_inpainting_keeps_known_tokens(known):
    model = tiny(attention="sparse")
    text, image = batch(model)
    codes = sample(model, text, known_codes=image, known_mask=known).flatten(1)
    keep = known.flatten()
    assert torch.equal(codes[:, keep], image[:, keep])
    assert not torch.equal(codes[:, ~keep], image[:, ~keep])


def test_region_masks():
    assert torch.equal(box_mask(SIDE, (2, 3, 6, 7)), box_mask(SIDE, (0.25, 0.375, 0.75, 0.875)))
    assert (~box_mask(SIDE, (2, 3, 6, 7))).sum() == 16 and (~border_mask(SIDE, 1)).sum() == 28
    assert prime_mask(SIDE, 3).sum() == 24
    with pytest.raises(ValueError, match="prime rows 9"):
        prime_mask(SIDE, 9)
    with pytest.raises(ValueError, match="empty or outside"):
        box_mask(SIDE, (4, 4, 2, 6))
    with pytest.raises(ValueError, match="border 4"):
        border_mask(SIDE, 4)


def test_log_likelihood_is_the_teacher_forced_sum():
    model = tiny(attention="sparse")
    text, codes = batch(model, b=5)
    ll = log_likelihood(model, text, codes, batch_size=2)
    manual = []
    with torch.no_grad():
        for t, c in zip(text, codes):
            _, logits = model(t[None], c[None])
            lp = F.log_softmax(logits[0].double(), -1)
            manual.append(sum(lp[j, c[j]] for j in range(len(c))))
    assert torch.allclose(ll.double(), torch.stack(manual), atol=1e-3)
    # the model's own samples at low temperature are more likely than random codes
    sampled = sample(model, text, temperature=0.3)
    assert (log_likelihood(model, text, sampled) > ll).all()


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).sum() == 1
    assert torch.isfinite(filter_logits(logits, top_p=float(p[0] + 0.01))).sum() == 2
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_token(logits.expand(64, -1), 1.0, 2, 0.0, g) for _ in range(20)])
    assert set(draws.unique().tolist()) == {0, 1}
    # top-k 1 is greedy decoding
    model = tiny(attention="sparse")
    text, _ = batch(model)
    assert torch.equal(sample(model, text, top_k=1), sample(model, text, temperature=0))


def test_sampler_matches_the_distribution():
    """The exponential-race sampler draws from softmax(logits / temperature)."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_token(logits.expand(40000, -1), 0.5, 0, 0.0, g)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, (logits / 0.5).softmax(-1), atol=0.01)


def test_decode_step_is_one_graph_for_every_position():
    """torch.compile traces the decode step whole (fullgraph: no breaks, so CUDA graphs can capture it) and
    never recompiles as the position advances; the traced step gives the eager logits."""
    import torch._dynamo

    model = tiny(attention="sparse", rotary=True)
    text, codes = batch(model)
    torch._dynamo.reset()
    step = torch.compile(model.decode_step, backend="eager", fullgraph=True, dynamic=False)
    eager_cache, traced_cache = model.new_cache(len(text)), model.new_cache(len(text))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        model.prefill(text, eager_cache), model.prefill(text, traced_cache)
        positions = torch.arange(SIDE * SIDE)
        for i in range(12):
            a = model.decode_step(codes[:, i], positions[i], eager_cache)
            b = step(codes[:, i], positions[i], traced_cache)
            assert torch.allclose(a, b, atol=1e-5)


def test_sparse_decode_steps_read_a_fixed_key_set():
    """A decode step gathers text keys + the mask's image distances: row w + 1, column h, conv 6 + 5 * 11."""
    from dalle_ar.config import preset
    from dalle_ar.model.transformer import image_offsets

    cfg = preset(DalleConfig, "base")  # 32 x 32 grid
    assert image_offsets("row", cfg).tolist() == list(range(33))
    assert image_offsets("column", cfg).tolist() == list(range(0, 1024, 32))
    assert len(image_offsets("conv", cfg)) == 61 and image_offsets("full", cfg) is None


def test_compiled_decode_step_writes_the_cache_in_place():
    """Sampling with the compiled decode step writes each token's keys/values into the cache where they are: no
    loop of the step's generated code runs over a whole layer's buffer (through views of one shared (layers, ...)
    buffer Inductor copied every layer's whole buffer out and back at every token: on CPU, 256 image tokens at
    batch 8 sampled 4-6x slower than eager), and it draws what eager sampling does."""
    import re

    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    model = tiny(attention="sparse")
    text, _ = batch(model, b=4)
    layer_numel = model.new_cache(len(text)).k[0].numel()
    torch._dynamo.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):  # generate the code afresh, to read it
        compiled, sources = run_and_get_code(sample, model, text, compile=True)
    loop = re.compile(r"for\(int64_t \w+=static_cast<int64_t>\(0L\); \w+<static_cast<int64_t>\((\d+)L\)")
    trips = [int(n) for src in sources for n in loop.findall(src)]
    assert trips and max(trips) < layer_numel, (max(trips, default=0), layer_numel)
    assert torch.equal(compiled, sample(model, text))
