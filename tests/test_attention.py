"""The paper's sparse attention masks (appendix B.1, figure 11), their two kernels, and the KV cache."""

import pytest
import torch

from dalle_ar.config import ConfigError, DalleConfig, preset
from dalle_ar.model import DalleTransformer
from dalle_ar.model.attention import block_mask, dense_mask
from dalle_ar.sampling import generate_codes

KINDS = ["full", "row", "column", "conv"]
CPU = torch.device("cpu")


def image_mask(kind, text_len, w):
    """Mask between image tokens as a (w, w, w, w) grid: [qr, qc, kr, kc], plus the full mask."""
    full = dense_mask(kind, text_len + 1 + w * w, text_len + 1, w, CPU)
    img = full[text_len + 1:, text_len + 1:]
    return img.reshape(w, w, w, w), full


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_causal_and_image_queries_see_all_text(kind):
    text_len, w = 5, 8
    _, m = image_mask(kind, text_len, w)
    assert not m.triu(1).any()                           # never a future key
    assert m[: text_len + 1, : text_len + 1].equal(torch.ones(text_len + 1, text_len + 1).tril().bool())
    assert m[text_len + 1:, : text_len + 1].all()        # every image query sees BOS and all text
    assert m.diagonal().all()                            # every slot sees itself


def test_row_mask_is_the_previous_w_plus_1_tokens():
    """Figure 11(a): each image token attends the previous w + 1 tokens in raster order (itself included),
    so the oldest is the one above it: its row up to itself and the previous row from its column on."""
    w = 8
    grid, _ = image_mask("row", 3, w)
    r, c = 4, 3
    seen = {(kr, kc) for kr, kc in grid[r, c].nonzero().tolist()}
    assert seen == {(r, j) for j in range(c + 1)} | {(r - 1, j) for j in range(c, w)}
    assert not grid[r, c, r - 1, c - 1] and not grid[r, c, r - 2].any()  # blocks beyond the window


def test_column_mask_is_the_same_column_above():
    w = 8
    grid, _ = image_mask("column", 3, w)
    r, c = 5, 2
    seen = {(kr, kc) for kr, kc in grid[r, c].nonzero().tolist()}
    assert seen == {(i, c) for i in range(r + 1)}


def test_conv_mask_is_a_causal_11x11_kernel_with_wraparound():
    w = 16
    grid, _ = image_mask("conv", 3, w)
    r, c = 8, 8  # interior: exactly the causal part of the 11x11 neighbourhood
    seen = {(kr, kc) for kr, kc in grid[r, c].nonzero().tolist()}
    assert seen == {(i, j) for i in range(r - 5, r + 1) for j in range(c - 5, c + 6) if (i, j) <= (r, c)}
    # at the left edge the window continues, in raster order, at the end of the row above (figure 11(d))
    assert grid[8, 0, 6, 15] and grid[8, 0, 7, 5] and not grid[8, 0, 7, 6]


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_sparse_masks_differ_from_full(kind):
    _, m = image_mask(kind, 5, 12)
    _, full = image_mask("full", 5, 12)
    assert (m <= full).all() and m.sum() < full.sum()


def test_masks_are_built_once_per_kind_length_and_device():
    assert dense_mask("row", 30, 6, 4, CPU) is dense_mask("row", 30, 6, 4, CPU)
    assert block_mask("row", 30, 6, 4, CPU) is block_mask("row", 30, 6, 4, CPU)


@pytest.mark.parametrize("kind", KINDS)
def test_block_mask_skips_exactly_the_fully_masked_blocks(kind):
    """Paper layout (256 text slots, 32x32 grid): the BlockMask keeps a 128x128 block iff the reference mask
    allows any pair in it; row, column and conv layers skip blocks the causal mask computes."""
    s, text_slots, w = 1280, 257, 32
    ref = dense_mask(kind, s, text_slots, w, CPU)
    bm, order = block_mask(kind, s, text_slots, w, CPU)
    if order is not None:  # column layers attend over column-major image slots (figure 11(c))
        assert kind == "column" and sorted(order.tolist()) == list(range(s))
        ref = ref[order][:, order]
    blocks = bm.to_dense()[0, 0].bool()
    assert blocks.equal(ref.reshape(10, 128, 10, 128).any(3).any(1))
    causal_blocks = 55
    assert blocks.sum() == causal_blocks if kind == "full" else blocks.sum() < causal_blocks


def tiny(**kw) -> DalleTransformer:
    torch.manual_seed(0)
    kw = dict(dim=32, depth=2, heads=2, text_vocab_size=50) | kw
    return DalleTransformer(preset(DalleConfig, "tiny", **kw)).eval()


def batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return (torch.randint(0, cfg.num_text_tokens, (b, cfg.text_len), generator=g),
            torch.randint(0, cfg.num_image_tokens, (b, cfg.image_seq_len), generator=g))


@pytest.mark.parametrize("kind", KINDS)
def test_flex_and_sdpa_give_the_same_logits(kind):
    """FlexAttention runs eagerly on CPU (compiled on CUDA; no CPU backward, hence no_grad); same weights,
    same logits."""
    sdpa = tiny(attention=kind)
    flex = tiny(attention=kind, attention_backend="flex")
    flex.load_state_dict(sdpa.state_dict())
    text, codes = batch(sdpa)
    with torch.no_grad():
        pairs = list(zip(sdpa(text, codes), flex(text, codes)))
    for a, b in pairs:
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("attention,extra", [("full", {}), ("row", {}), ("column", {}), ("conv", {}),
                                             ("sparse", dict(depth=4)),
                                             ("sparse", dict(depth=4, rotary=True, sandwich_norm=True)),
                                             ("sparse", dict(depth=4, attention_backend="flex"))])
def test_cached_logits_match_full_forward_for_every_mask(attention, extra):
    """Prefill [BOS, text], then one image token at a time: the query at slot p reads row p of its mask."""
    model = tiny(attention=attention, **extra)
    text, codes = batch(model)
    with torch.no_grad():
        _, full = model(text, codes)
    _, cached = generate_codes(model, text, forced=codes, return_logits=True)
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


def test_chunked_decode_matches_full_forward_with_sparse_masks():
    model = tiny(attention="sparse", depth=4)
    text, codes = batch(model)
    _, full = model(text, codes)
    cache = model.new_cache(2)
    model.prefill(text, cache)
    h = model.trunk(model.embed_image(codes[:, :20]), cache)
    assert torch.allclose(model.to_image_logits(h), full[:, 1:21], atol=1e-4)


def test_sparse_schedule_follows_the_paper():
    """Appendix B.1: layers i = 1..63 use column when (i - 2) % 4 == 0, else row; conv in the last."""
    kinds = preset(DalleConfig, "paper").layer_attention
    assert len(kinds) == 64 and kinds[:8] == ["row", "column", "row", "row", "row", "column", "row", "row"]
    assert kinds[-1] == "conv" and kinds.count("column") == 16 and kinds.count("conv") == 1
    assert DalleConfig(depth=3, attention="row, column,conv").layer_attention == ["row", "column", "conv"]
    assert preset(DalleConfig, "tiny").attention == "full"


@pytest.mark.parametrize("field,value,message", [
    ("attention", "diagonal", "attention: 'diagonal'"),
    ("attention", "row,column", "got 2 entries"),
    ("attention_backend", "xformers", "attention_backend"),
    ("null_cond_prob", 1.0, "null_cond_prob"),
])
def test_bad_attention_config_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DalleConfig(depth=4, **{field: value})
