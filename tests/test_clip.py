"""open_clip: build from config, train through the engine, export/load locally, rerank."""

import re
import warnings

import numpy as np
import pytest
import torch

from dalle_ar.clip import (CachedTokenizer, ClipScorer, build_clip, clip_tokenizer, contrastive_loss, load_clip,
                           normalize_images, overlong, rerank)
from dalle_ar.config import ClipConfig, TrainConfig
from dalle_ar.data import synthetic
from dalle_ar.engine import Trainer

CFG = ClipConfig(image_size=64, embed_dim=64, vision_layers=2, vision_width=96, patch_size=16, context_length=16,
                 text_width=64, text_heads=2, text_layers=2)


def examples(n, seed):
    pairs = [synthetic.make_example(i, seed=seed, max_shapes=1) for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im, _ in pairs]).float() / 255
    return images, [t for _, t in pairs]


@pytest.fixture(scope="module")
def trained_clip(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    images, texts = examples(2000, seed=0)
    tok = clip_tokenizer(CFG)

    def stream():
        g = torch.Generator().manual_seed(0)
        while True:
            idx = torch.randperm(len(texts), generator=g)[:64]
            yield images[idx], tok([texts[i] for i in idx])

    cfg = TrainConfig(out=str(out), steps=150, batch_size=64, lr=2e-3, warmup_steps=20, zero_stage=2,
                      wandb="disabled", progress=False, weight_decay=0.1)
    from dalle_ar.clip import clip_export_config, export_files

    trainer = Trainer(build_clip(CFG), cfg, name="clip", export_config=clip_export_config(CFG),
                      extra_files=export_files(CFG, out / "oc"))
    export = trainer.fit(stream(), lambda e, b, s: contrastive_loss(e, normalize_images(trainer.module, b[0]), b[1]))
    return export


def rerank_quality(scorer, images, texts):
    """(captions whose best image has the right colour and shape, captions whose image is in the top 3)"""
    specs = [synthetic.parse_caption(t).shapes[0] for t in texts]
    right_kind = in_top3 = 0
    for i, text in enumerate(texts):
        order, _ = rerank(scorer, images, text)
        best = specs[int(order[0])]
        right_kind += (best.color, best.shape) == (specs[i].color, specs[i].shape)
        in_top3 += i in order[:3].tolist()
    return right_kind, in_top3


def test_rerank_orders_matching_captions_first(trained_clip):
    images, texts = examples(16, seed=7)
    right_kind, in_top3 = rerank_quality(ClipScorer.load(str(trained_clip)), images, texts)
    assert right_kind >= 12 and in_top3 >= 12, (right_kind, in_top3)
    # an untrained CLIP of the same shape is near chance
    untrained = rerank_quality(ClipScorer(build_clip(CFG), clip_tokenizer(CFG)), images, texts)
    assert untrained[0] <= 8 and untrained[1] <= 8, untrained


def test_caption_logprob_classifies_among_the_caption_and_its_near_misses(trained_clip):
    """CLIP as a zero-shot classifier over a caption and its one-attribute variants: a probability over that set at
    the CLIP's own scale, and a trained CLIP gives a render's own caption more than chance among its variants."""
    scorer = ClipScorer.load(str(trained_clip))
    images, texts = examples(8, seed=7)
    text, variants = texts[0], [c for _, c in synthetic.variants(texts[0])]
    logp = scorer.caption_logprob(images, text, variants)
    assert logp.shape == (8,) and (logp <= 0).all()
    assert torch.equal(scorer.caption_logprob(images, text, []), torch.zeros(8))
    assert torch.allclose(scorer.caption_logprob(images, text, [text]), torch.full((8,), -np.log(2)), atol=1e-5)
    every = torch.stack([scorer.caption_logprob(images, c, [o for o in [text, *variants] if o != c])
                         for c in [text, *variants]], 1)
    assert torch.allclose(every.exp().sum(1), torch.ones(8), atol=1e-4)  # one distribution over the set
    own = [float(scorer.caption_logprob(images[i:i + 1], t, [c for _, c in synthetic.variants(t)]))
           for i, t in enumerate(texts)]
    chance = [-np.log(1 + len(synthetic.variants(t))) for t in texts]
    assert sum(o > c for o, c in zip(own, chance)) >= 7, (own, chance)  # a render prefers its caption to its near misses


def test_export_is_an_open_clip_local_dir(trained_clip):
    import open_clip

    model = open_clip.create_model(f"local-dir:{trained_clip}").eval()
    ours, _ = load_clip(str(trained_clip))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(model.encode_image(x), ours.encode_image(x), atol=1e-6)


def test_user_checkpoint_by_arch_and_path(trained_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="never"):
        load_clip("ViT-B-32:openai")  # a tag would download: refused
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(str(tmp_path))
    import open_clip

    # an open_clip architecture with a local weights file (here a freshly initialised RN50 saved to disk)
    model = open_clip.create_model("RN50", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "rn50.pt")
    loaded, tok = load_clip(f"RN50:{tmp_path / 'rn50.pt'}")
    first = next(iter(model.state_dict()))
    assert torch.equal(loaded.state_dict()[first], model.state_dict()[first])
    assert tok(["a red circle"]).shape[-1] == 77


def test_clip_score_and_top_k_of_n():
    from dalle_ar.clip import best_first, clip_score

    cos = torch.tensor([0.20, -0.10, 0.31, 0.20])
    assert clip_score(cos).tolist() == pytest.approx([20.0, 0.0, 31.0, 20.0])
    assert best_first(cos).tolist() == [2, 0, 3, 1]  # ties keep sampling order
    assert best_first(cos, 2).tolist() == [2, 0]


def test_cached_tokenizer_gives_the_tokenizers_rows_and_encodes_each_caption_once():
    tok = clip_tokenizer(CFG)
    seen = []

    def counting(texts):
        seen.extend(texts)
        return tok(texts)

    texts = [t for _, t in (synthetic.make_example(i, seed=0) for i in range(6))]
    batch = texts + texts[:3] + ["a caption a little too long for sixteen tokens " * 2]
    cached = CachedTokenizer(counting, max_captions=8)
    assert torch.equal(cached(batch), tok(batch)) and sorted(seen) == sorted(set(batch))
    assert torch.equal(cached(texts[2]), tok([texts[2]])) and len(seen) == 7  # all cached: nothing encoded
    cached(["red", "blue"])  # past max_captions: the cache starts over with this batch
    assert len(cached.rows) == 2 and torch.equal(cached(["blue"]), tok(["blue"]))
    assert CachedTokenizer(tok).context_length == 16 and overlong(CachedTokenizer(tok), batch) == overlong(tok, batch)


def test_captions_longer_than_the_context_are_found_and_warned_about():
    tok = clip_tokenizer(CFG)  # context 16: start + 14 tokens + end
    fits, cut = "red " * 14, "red " * 15
    assert overlong(tok, [fits]) == [] and overlong(tok, [fits, cut]) == [(cut, 17)]
    assert overlong(tok, ["red", fits, cut], tok(["red", fits, cut])) == [(cut, 17)]  # given its rows: the same
    bangs = 'red !"!! ' * 6  # '!"!!' encodes as ids 0, 1, 748: the padding id inside the row
    assert (tok([bangs])[0] == 0).any() and overlong(tok, [bangs], tok([bangs])) == overlong(tok, [bangs]) != []
    row = tok([cut])[0]  # what open_clip does with it: no padding left, the last word replaced by the end token
    assert (row != 0).all() and row[-1] == tok.eot_token_id and torch.equal(row[:-1], tok([fits])[0][:-1])
    scorer = ClipScorer(build_clip(CFG), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.encode_texts([fits])
    with pytest.warns(UserWarning, match=r"CLIP reads 16 tokens, the caption 'red .*' has 17: .*longer context_length"):
        scorer.encode_texts([fits, cut])
    with warnings.catch_warnings():  # one warning per scorer, not one per caption (precompute_clip embeds millions)
        warnings.simplefilter("error")
        scorer.encode_texts([cut, "blue " * 20])
    assert scorer.num_truncated == 3


def test_unknown_arch_is_a_config_error(tmp_path):
    from dalle_ar.config import ConfigError

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown open_clip architecture 'NoSuchNet'"):
        load_clip(f"NoSuchNet:{weights}")
    with pytest.raises(FileNotFoundError, match="--clip-checkpoint"):
        load_clip(f"ViT-B-32:{tmp_path / 'missing.pt'}")


def test_sin_cos_positions_stay_fixed_through_training_and_export(tmp_path):
    """vision_pos_embed="sin_cos_2d" (the tiny preset's): open_clip's fixed 2D sine-cosine patch positions, untouched
    by training, written into the export's open_clip config and loaded back with the same outputs."""
    import dataclasses

    from dalle_ar import models
    from dalle_ar.clip import clip_export_config, export_files

    cfg = dataclasses.replace(CFG, vision_pos_embed="sin_cos_2d")
    torch.manual_seed(0)
    model = build_clip(cfg)
    fixed = model.visual.positional_embedding.detach().clone()
    assert not model.visual.positional_embedding.requires_grad
    images, texts = examples(64, seed=0)
    tok = clip_tokenizer(cfg)
    train = TrainConfig(out=str(tmp_path), steps=3, batch_size=32, lr=1e-2, warmup_steps=0, zero_stage=1,
                        wandb="disabled", progress=False)
    trainer = Trainer(model, train, name="clip", export_config=clip_export_config(cfg),
                      extra_files=export_files(cfg, tmp_path / "oc"))
    export = trainer.fit(iter([(images[:32], tok(texts[:32]))] * 3),
                         lambda e, b, s: contrastive_loss(e, normalize_images(trainer.module, b[0]), b[1]))
    loaded, _ = load_clip(str(export))
    assert torch.equal(loaded.visual.positional_embedding, fixed)
    assert models.load(export, kind="clip")[0].visual.positional_embedding.requires_grad is False
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.encode_image(x), trainer.module.eval().encode_image(x), atol=1e-5)


def test_negative_images_compete_with_each_captions_own_image():
    """contrastive_loss(negative_images=...): each caption's softmax also runs over the extra images, so a negative
    image that looks like the caption's own raises the loss; `negative_image_wins` counts captions that prefer one."""
    torch.manual_seed(0)
    model = build_clip(CFG)
    images, texts = examples(8, seed=0)
    tokens = clip_tokenizer(CFG)(texts)
    x = normalize_images(model, images)
    plain, _ = contrastive_loss(model, x, tokens)
    same, m = contrastive_loss(model, x, tokens, negative_images=x)  # each caption's own image, again, as a negative
    assert same > plain + 0.3 and m["negative_image_wins"] >= 0.0
    # with text negatives too: both metrics, and a finite loss that trains the image tower
    model.zero_grad()
    neg_tokens = clip_tokenizer(CFG)([w for t in texts for w in synthetic.wrong_captions(t, 1, np.random.default_rng(0))])
    both, m2 = contrastive_loss(model, x, tokens, neg_tokens, negative_images=x.flip(0))
    assert set(m2) >= {"negative_wins", "negative_image_wins"} and torch.isfinite(both)
    both.backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0


CLIP_ARGS = ("--steps", "6", "--batch_size", "8", "--warmup_steps", "1", "--embed_dim", "32", "--vision_layers", "1",
             "--vision_width", "64", "--patch_size", "16", "--text_width", "32", "--text_heads", "2", "--text_layers", "1",
             "--save_every", "0", "--wandb", "disabled", "--no-progress", "--hard_negative_images", "2")


def test_train_clip_hard_negative_images_rerender_each_scene_and_count_samples_without_one(tmp_path):
    """--hard_negative_images: the world comes from the shards' stats.json, each scene is re-rendered with attributes
    changed, and the images compete (negative_image_wins logged); a sample from elsewhere is counted (no_scene), and
    shards that are not the world's stop at once with the fix, instead of training without the negatives unnoticed."""
    import json
    import shutil
    import subprocess
    import sys

    from conftest import ROOT, run_script, script_env
    from dalle_ar.data import write

    data = tmp_path / "shapes"
    run_script("train/make_shards.py", "synthetic", "--out", str(data), "--num", "60", "--samples_per_shard", "30",
               "--seed", "3")
    assert json.loads((data / "stats.json").read_text())["seed"] == 3
    write.write_image_shards(((f"photo_{i}", *synthetic.make_example(i)) for i in range(30)), tmp_path / "photos",
                             samples_per_shard=30)
    shutil.copy(tmp_path / "photos" / "000000.tar", data / "zz_other.tar")  # a shard of another source among the world's
    out = tmp_path / "clip"
    proc = run_script("train/train_clip.py", "--data", str(data), "--out", str(out), *CLIP_ARGS, "--log_every", "1")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    wins = [r["negative_image_wins"] for r in rows if "negative_image_wins" in r]
    assert len(wins) >= 5 and all(0 <= w <= 1 for w in wins)
    assert re.search(r"no_scene [1-9]\d* \(kept\)", proc.stdout), proc.stdout[-2000:]

    def fails(path):
        proc = subprocess.run([sys.executable, "train/train_clip.py", "--data", str(path), "--out", str(tmp_path / "x"),
                               *CLIP_ARGS], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        return proc.stderr.strip().splitlines()[-1]

    assert "has no stats.json of `make_shards.py synthetic`" in fails(tmp_path / "photos")  # no stats.json at all
    stats = json.loads((data / "stats.json").read_text())
    (data / "stats.json").write_text(json.dumps({**stats, "seed": 4}))  # says another world than the shards hold
    last = fails(data)
    assert "no sample of the first 4 batches" in last and "remake the shards" in last, last


def test_train_clip_morph_negative_images_compete_with_each_scene_and_name_their_flag(tmp_path):
    """--morph_negative_images alone: each scene's in-between render competes with it (negative_image_wins logged),
    and shards that are not the world's fail with the flag's own name."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, run_script, script_env
    from dalle_ar.data import write

    args = [a for a in CLIP_ARGS[:-2]] + ["--morph_negative_images", "1", "--log_every", "1"]
    data = tmp_path / "shapes"
    run_script("train/make_shards.py", "synthetic", "--out", str(data), "--num", "40", "--samples_per_shard", "40")
    run_script("train/train_clip.py", "--data", str(data), "--out", str(tmp_path / "clip"), *args)
    rows = [json.loads(r) for r in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "negative_image_wins" in r]) >= 5
    write.write_image_shards(((f"photo_{i}", *synthetic.make_example(i)) for i in range(10)), tmp_path / "photos",
                             samples_per_shard=10)
    proc = subprocess.run([sys.executable, "train/train_clip.py", "--data", str(tmp_path / "photos"), "--out",
                           str(tmp_path / "x"), *args], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "--morph_negative_images renders the shapes world's scenes" in proc.stderr.strip().splitlines()[-1]
