"""Tests for the shapes world (dalle_ar.data.synthetic): determinism, caption grammar, and the
pixel checker's acceptance of true captions (also after blur/JPEG) and rejection of wrong ones."""

from __future__ import annotations

import dataclasses
import io
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dalle_ar.data import synthetic as S

N = 300  # examples per measured rate
SEED = 1234

OPPOSITE = {
    "on the left": "on the right",
    "on the right": "on the left",
    "at the top": "at the bottom",
    "at the bottom": "at the top",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def jpeg(im: Image.Image, quality: int = 90) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def blur(im: Image.Image) -> Image.Image:
    """Gaussian blur of radius 1 at 64 px, scaled with the image (radius 4 at 256 px)."""
    return im.filter(ImageFilter.GaussianBlur(im.width / 64))


def color_shift(im: Image.Image) -> Image.Image:
    """Slightly dimmer with a per-channel cast, like a model's colour drift."""
    levels = np.arange(256) * 0.92
    luts = [np.clip(levels + off, 0, 255).round().astype(int) for off in (12, -10, 8)]
    return im.point([v for lut in luts for v in lut])


def speckle(im: Image.Image, frac: float = 0.02, seed: int = 0) -> Image.Image:
    """Replace a few percent of pixels with random colours."""
    rng = np.random.default_rng(seed)
    a = np.asarray(im).copy()
    hit = rng.random(a.shape[:2]) < frac
    a[hit] = rng.integers(0, 256, (int(hit.sum()), 3))
    return Image.fromarray(a)


def degrade(im: Image.Image) -> Image.Image:
    return speckle(jpeg(blur(color_shift(im))))


@lru_cache(maxsize=None)
def scenes(n: int = N, seed: int = SEED) -> tuple[S.Scene, ...]:
    return tuple(S.sample_scene(np.random.default_rng([seed, i])) for i in range(n))


@lru_cache(maxsize=None)
def images(size: int, transform: str = "clean") -> tuple[Image.Image, ...]:
    if transform == "clean":
        return tuple(S.render(sc, size) for sc in scenes())
    fn = {"blur": blur, "jpeg": jpeg, "blur+jpeg": lambda im: jpeg(blur(im)), "degrade": degrade}
    return tuple(fn[transform](im) for im in images(size))


def acceptance(size: int, transform: str = "clean") -> float:
    ok = [S.check(im, S.caption(sc)) for im, sc in zip(images(size, transform), scenes())]
    return float(np.mean(ok))


def with_shape(spec: S.SceneSpec, k: int, **changes) -> S.SceneSpec:
    shapes = list(spec.shapes)
    shapes[k] = S.ShapeSpec(**{**vars(shapes[k]), **changes})
    return S.SceneSpec(tuple(shapes), spec.relation)


def corrupt(spec: S.SceneSpec, kind: str, rng: np.random.Generator) -> S.SceneSpec | None:
    """A caption that is wrong about exactly one thing; None if not applicable to this scene."""
    k = int(rng.integers(len(spec.shapes)))
    if kind == "color":
        unused = [c for c in S.COLORS if c not in {s.color for s in spec.shapes}]
        return with_shape(spec, k, color=unused[int(rng.integers(len(unused)))])
    if kind == "shape":
        others = [s for s in S.SHAPES if s != spec.shapes[k].shape]
        return with_shape(spec, k, shape=others[int(rng.integers(len(others)))])
    if kind == "size":
        return with_shape(spec, k, size="large" if spec.shapes[k].size == "small" else "small")
    if kind == "relation" and len(spec.shapes) == 2:
        return S.SceneSpec(spec.shapes, OPPOSITE[spec.relation])
    if kind == "position" and len(spec.shapes) == 1:
        return S.SceneSpec(spec.shapes, OPPOSITE[spec.relation])
    return None


def rejection(kind: str, size: int = 64, transform: str = "clean") -> tuple[float, int]:
    rng = np.random.default_rng(0)
    rejected = []
    for im, sc in zip(images(size, transform), scenes()):
        bad = corrupt(sc.spec, kind, rng)
        if bad is not None:
            rejected.append(not S.check(im, S.caption(bad)))
    return float(np.mean(rejected)), len(rejected)


# ---------------------------------------------------------------------------------------------
# Determinism and sampling
# ---------------------------------------------------------------------------------------------


def test_make_example_is_deterministic():
    for index in (0, 1, 17):
        im1, cap1 = S.make_example(index, seed=5)
        im2, cap2 = S.make_example(index, seed=5)
        assert cap1 == cap2
        assert im1.mode == "RGB" and im1.size == (64, 64)
        assert im1.tobytes() == im2.tobytes()


def test_different_indices_and_seeds_differ():
    examples = [S.make_example(i, seed=0) for i in range(50)]
    assert len({im.tobytes() for im, _ in examples}) >= 49
    assert len({cap for _, cap in examples}) >= 40
    other_seed = [S.make_example(i, seed=1) for i in range(50)]
    same = sum(a[0].tobytes() == b[0].tobytes() for a, b in zip(examples, other_seed))
    assert same <= 1


def test_make_example_options():
    im, cap = S.make_example(3, seed=2, image_size=128, max_shapes=1)
    assert im.size == (128, 128)
    assert len(S.parse_caption(cap).shapes) == 1
    two = [S.make_example(i, p_two=1.0)[1] for i in range(20)]
    assert all(len(S.parse_caption(c).shapes) == 2 for c in two)
    with pytest.raises(ValueError):
        S.sample_scene(np.random.default_rng(0), max_shapes=3)


def test_sampled_scenes_are_well_formed():
    n_two = 0
    for sc in scenes():
        assert 1 <= len(sc.shapes) <= 2
        for s in sc.shapes:
            assert s.color in S.COLORS and s.shape in S.SHAPES and s.size in S.SIZES
            assert isinstance(s.color, str) and type(s.x) is float
            r = S.SIZE_FRAC[s.size] / 2
            assert r <= s.x <= 1 - r and r <= s.y <= 1 - r, "shape leaves the image"
        if len(sc.shapes) == 1:
            assert sc.relation in S.POSITIONS
            continue
        n_two += 1
        a, b = sc.shapes
        assert a.color != b.color
        axis, sign = S.RELATIONS[sc.relation]
        d = np.array([a.x - b.x, a.y - b.y])
        reach = (S.SIZE_FRAC[a.size] + S.SIZE_FRAC[b.size]) / 2
        assert sign * d[axis] >= reach + S.MIN_GAP - 1e-9, "shapes too close along the axis"
        assert abs(d[1 - axis]) < abs(d[axis]), "relation axis must dominate"
    assert 0.35 < n_two / len(scenes()) < 0.65


def test_sampling_covers_the_vocabulary():
    seen = {"color": set(), "shape": set(), "size": set(), "relation": set()}
    for sc in scenes():
        seen["relation"].add(sc.relation)
        for s in sc.shapes:
            seen["color"].add(s.color)
            seen["shape"].add(s.shape)
            seen["size"].add(s.size)
    assert seen["color"] == set(S.COLORS)
    assert seen["shape"] == set(S.SHAPES)
    assert seen["size"] == set(S.SIZES)
    assert seen["relation"] == set(S.POSITIONS) | set(S.RELATIONS)


def test_render_is_resolution_independent():
    """A 256 px render, box-downsampled, is (almost) the 64 px render."""
    for sc in scenes()[:20]:
        small = np.asarray(S.render(sc, 64)).astype(int)
        big = np.asarray(S.render(sc, 256).resize((64, 64), Image.Resampling.BOX)).astype(int)
        differ = np.abs(small - big).max(-1) > 100
        assert differ.mean() < 0.03


def test_shapes_are_big_enough_for_a_token_grid():
    side = {k: v * 64 for k, v in S.SIZE_FRAC.items()}
    assert 16 <= side["small"] <= 20 and 26 <= side["large"] <= 32
    for s in S.SHAPES:  # every kind actually paints roughly its expected pixel count
        sc = S.Scene((S.Shape("red", s, "large", 0.5, 0.5),), None)
        painted = (np.asarray(S.render(sc, 64)) != S.BACKGROUND).any(-1).sum()
        assert painted > 0.45 * side["large"] ** 2


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def test_caption_examples():
    one = S.Scene((S.Shape("red", "circle", "small", 0.25, 0.5),), "on the left")
    assert S.caption(one) == "a small red circle on the left"
    a = S.Shape("blue", "square", "large", 0.25, 0.5)
    b = S.Shape("green", "triangle", "small", 0.75, 0.5)
    two = S.Scene((a, b), "to the left of")
    assert S.caption(two) == "a large blue square to the left of a small green triangle"


def test_parse_caption_round_trips():
    for sc in scenes():
        text = S.caption(sc)
        assert text == text.lower() and not text.endswith(".")
        assert S.parse_caption(text) == sc.spec
        assert S.caption(S.parse_caption(text)) == text


def test_parse_caption_is_lenient_about_formatting():
    spec = S.parse_caption("  A Small  RED circle on the left. ")
    assert spec == S.SceneSpec((S.ShapeSpec("red", "circle", "small"),), "on the left")
    assert S.parse_caption("a large green square").relation is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "a red circle on the left",  # no size
        "a small pink circle on the left",  # unknown colour
        "a small red hexagon on the left",  # unknown shape
        "a medium red circle on the left",  # unknown size
        "a small red circle in the middle",  # unknown position
        "a small red circle next to a large blue square",  # unknown relation
        "a small red circle to the left of",  # dangling relation
        "a small red circle on the left of a large blue square",  # position used as relation
        "a small red circle to the left of a large red square",  # same colour twice
        "a small red circle above a large blue square below a small green triangle",
    ],
)
def test_parse_caption_rejects_garbage(text):
    with pytest.raises(ValueError):
        S.parse_caption(text)


# ---------------------------------------------------------------------------------------------
# Checker: acceptance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_check_accepts_true_captions(size):
    assert acceptance(size) >= 0.99


def test_check_accepts_true_captions_at_32px():
    assert acceptance(32) >= 0.97  # 9 px small shapes: pixelation makes circles look squarish


@pytest.mark.parametrize(
    "size, transform",
    [(64, "blur"), (64, "jpeg"), (64, "blur+jpeg"), (64, "degrade"),
     (256, "blur+jpeg"), (256, "degrade")],
)
def test_check_tolerates_degradation(size, transform):
    assert acceptance(size, transform) >= 0.95


def test_check_accepts_all_input_formats():
    im, text = S.make_example(4, seed=9)
    u8 = np.asarray(im)
    hwc = u8.astype(np.float32) / 255
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    for x in (im, u8, hwc, chw, hwc.astype(np.float64)):
        assert S.check(x, text)
    assert S.check_batch([im, chw], [text, text]) == [True, True]
    with pytest.raises(ValueError):
        S.check_batch([im], [text, text])


def test_check_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    im, text = S.make_example(4, seed=9)
    t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    assert S.check(t, text)
    assert S.check(t.to(torch.bfloat16), text)
    assert S.check_batch(t[None].repeat(2, 1, 1, 1), [text, text]) == [True, True]


# ---------------------------------------------------------------------------------------------
# Checker: rejection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["color", "shape", "size", "relation", "position"])
def test_check_rejects_corrupted_captions(kind):
    rate, n = rejection(kind)
    assert n >= 100
    assert rate >= 0.95, f"{kind}: only {rate:.1%} of {n} wrong captions rejected"


@pytest.mark.parametrize("kind", ["color", "shape", "size", "relation", "position"])
def test_check_rejects_corrupted_captions_on_degraded_images(kind):
    rate, _ = rejection(kind, transform="degrade")
    assert rate >= 0.95


def test_check_rejects_missing_and_extra_shapes():
    # An image with two shapes does not match a caption naming only one of them, and vice versa.
    two = [(im, sc) for im, sc in zip(images(64), scenes()) if len(sc.shapes) == 2][:50]
    one = [(im, sc) for im, sc in zip(images(64), scenes()) if len(sc.shapes) == 1][:50]
    for im, sc in two:
        assert not S.check(im, S.caption(S.Scene(sc.shapes[:1], None)))
    for (im, _), (_, sc) in zip(one, two):
        assert not S.check(im, S.caption(sc))


def test_check_rejects_blank_image():
    blank = Image.new("RGB", (64, 64), S.BACKGROUND)
    for sc in scenes()[:30]:
        assert not S.check(blank, S.caption(sc))
    assert S.find_blobs(blank) == []


def test_check_rejects_random_noise():
    rng = np.random.default_rng(0)
    for i, sc in enumerate(scenes()[:30]):
        size = 64 if i % 2 else 256
        noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        assert not S.check(noise, S.caption(sc))
        assert not S.check(rng.random((3, 64, 64)), S.caption(sc))


def test_check_raises_on_non_caption():
    im, _ = S.make_example(0)
    with pytest.raises(ValueError):
        S.check(im, "a photo of a cat")


# ---------------------------------------------------------------------------------------------
# Per-attribute verdicts (the failure names in evaluation reports)
# ---------------------------------------------------------------------------------------------


def test_attributes_of_true_captions_all_pass_and_agree_with_check():
    for im, sc in zip(images(64)[:100], scenes()[:100]):
        text = S.caption(sc)
        verdict = S.attributes(im, text)
        assert set(verdict) == {"colour", "shape", "size", "count", "position" if len(sc.shapes) == 1 else "relation"}
        assert all(verdict.values()) == S.check(im, text)


@pytest.mark.parametrize("kind", ["color", "shape", "size", "relation", "position"])
def test_attributes_name_the_corrupted_word(kind):
    # A caption wrong about one thing: the attribute for that thing fails; the others mostly still pass.
    name = {"color": "colour"}.get(kind, kind)
    rng = np.random.default_rng(0)
    named, others_pass = [], []
    for im, sc in zip(images(64), scenes()):
        bad = corrupt(sc.spec, kind, rng)
        if bad is None or not S.check(im, S.caption(sc)):
            continue
        verdict = S.attributes(im, S.caption(bad))
        named.append(not verdict[name])
        if kind in ("shape", "size", "relation", "position"):  # a wrong colour also fails that object's other words
            others_pass.append(all(v for a, v in verdict.items() if a != name))
    assert len(named) >= 100 and np.mean(named) >= 0.95, f"{kind}: {np.mean(named):.1%} named"
    if others_pass:
        assert np.mean(others_pass) >= 0.9


def test_attributes_agree_with_check_on_wrong_captions():
    rng = np.random.default_rng(1)
    for im, sc in zip(images(64, "degrade"), scenes()):
        bad = corrupt(sc.spec, ["color", "shape", "size", "relation", "position"][int(rng.integers(5))], rng)
        text = S.caption(bad if bad is not None else sc.spec)
        assert all(S.attributes(im, text).values()) == S.check(im, text)


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "position", "relation"])
def test_perturb_changes_exactly_one_attribute(attribute):
    rng = np.random.default_rng(3)
    scenes_ = [sc for sc in scenes() if attribute in S.perturbable(sc)][:120]
    assert len(scenes_) >= 100
    own, wrong = [], []
    for sc in scenes_:
        bad = S.perturb(sc, attribute, rng)
        assert S.perturb(sc.spec, attribute, np.random.default_rng(0)) != sc.spec
        assert sum(a != b for a, b in zip(S.caption(sc).split(), S.caption(bad).split())) <= 4  # one phrase changed
        im = S.render(bad)
        own.append(S.check(im, S.caption(bad)))  # the perturbed render shows its own caption ...
        verdict = S.attributes(im, S.caption(sc))  # ... and is wrong about the original in that attribute (only: a
        others = attribute == "colour" or all(v for a, v in verdict.items() if a != attribute)  # missing colour is more)
        wrong.append(not verdict[attribute] and others)
    assert np.mean(own) >= 0.95 and np.mean(wrong) >= 0.9, (np.mean(own), np.mean(wrong))


def test_perturb_refuses_an_attribute_the_scene_lacks():
    one = next(sc for sc in scenes() if len(sc.shapes) == 1)
    with pytest.raises(ValueError, match="relation"):
        S.perturb(one, "relation", np.random.default_rng(0))


@pytest.mark.parametrize("attribute", ["colour", "shape"])
def test_swap_binds_the_same_words_to_the_other_shape(attribute):
    """A swapped scene's caption has the original's words in another order; its render shows its own caption and
    fails the original's, while both shapes keep their places."""
    scenes_ = [sc for sc in scenes() if attribute in S.swappable(sc)][:80]
    assert len(scenes_) >= 60
    own, wrong = [], []
    for sc in scenes_:
        swapped = S.swap(sc, attribute)
        assert sorted(S.caption(swapped).split()) == sorted(S.caption(sc).split()) != S.caption(swapped).split()
        assert [(s.x, s.y) for s in swapped.shapes] == [(s.x, s.y) for s in sc.shapes]
        assert S.swap(sc.spec, attribute) == swapped.spec
        im = S.render(swapped)
        own.append(S.check(im, S.caption(swapped)))
        wrong.append(not S.check(im, S.caption(sc)))
    assert np.mean(own) >= 0.95 and np.mean(wrong) >= 0.95, (np.mean(own), np.mean(wrong))


def test_swap_refuses_what_would_not_change_the_binding():
    one = next(sc for sc in scenes() if len(sc.shapes) == 1)
    twins = next(sc for sc in scenes() if len(sc.shapes) == 2 and sc.shapes[0].shape == sc.shapes[1].shape)
    assert S.swappable(one) == () and "shape" not in S.swappable(twins)
    with pytest.raises(ValueError, match="swap"):
        S.swap(twins, "shape")


def test_variants_are_every_caption_wrong_in_exactly_one_attribute():
    """The contrast set of a caption: each shape in every unused colour, as each other kind, at the other size, then the
    mirrored position/relation; every one a caption the checker rejects on that attribute alone."""
    for sc in scenes()[:60]:
        text = S.caption(sc)
        found = S.variants(text)
        n = len(sc.shapes)
        expected = n * (len(S.COLORS) - n + len(S.SHAPES) - 1 + 1) + (sc.relation is not None)
        assert len(found) == expected and len({c for _, c in found}) == expected and text not in {c for _, c in found}
        assert found == S.variants(text)  # deterministic
        im = S.render(sc)
        for attribute, wrong in found:
            verdict = S.attributes(im, wrong)
            assert not verdict[attribute] and not S.check(im, wrong), (text, wrong)
            assert sum(a != b for a, b in zip(text.split(), wrong.split())) <= 3  # one phrase changed
    assert S.variants("a photo of a dog") == []


def test_a_morph_draws_a_shape_part_of_the_way_to_another_kind_in_the_same_box():
    """render(morphs=...): t = 0 is the shape itself and t = 1 the other kind, in between the picture moves steadily
    from one to the other, and nothing else in the scene changes."""
    for i in range(30):
        scene = S.example_scene(i, 0)
        plain = np.asarray(S.render(scene))
        for k, shape in enumerate(scene.shapes):
            for kind in (s for s in S.SHAPES if s != shape.shape):
                other = np.asarray(S.render(S.Scene(tuple(dataclasses.replace(s, shape=kind) if j == k else s
                                                          for j, s in enumerate(scene.shapes)), scene.relation)))
                assert np.array_equal(np.asarray(S.render(scene, morphs={k: (kind, 0.0)})), plain)
                assert (np.asarray(S.render(scene, morphs={k: (kind, 1.0)})) != other).any(-1).sum() <= 2  # rounding
                moved = [(np.asarray(S.render(scene, morphs={k: (kind, t)})) != plain).any(-1).sum()
                         for t in (0.25, 0.5, 0.75)]
                assert 0 < moved[0] <= moved[1] <= moved[2], (i, shape, kind, moved)
                morph = S.render(scene, morphs={k: (kind, 0.5)})
                assert S.attributes(morph, S.caption(scene))["colour"]  # the same shapes, only one outline moved


def test_morph_images_render_the_shard_example_with_one_shape_in_between_kinds():
    """Borderline hard negative images: example `key` with one shape drawn part of the way to another kind, closer to
    its clean render than a changed attribute is; nothing for a key that is not the example of that caption."""
    rng = np.random.default_rng(0)
    for i in range(20):
        image, text = S.make_example(i, seed=0)
        plain = np.asarray(image)
        morphs = S.morph_images(f"{i:09d}", text, 3, rng)
        assert len(morphs) == 3
        for m in morphs:
            changed = (np.asarray(m) != plain).any(-1)
            assert 0 < changed.sum() < 0.1 * changed.size
    assert S.morph_images("000000007", S.make_example(8)[1], 2, rng) == []
    assert S.morph_images("cat_0001", "a small red circle", 2, rng) == []
    assert S.morph_images("000000007", S.make_example(7)[1], 0, rng) == []


def test_wrong_images_render_the_shard_example_with_one_attribute_changed():
    """Hard negative images for CLIP: example `key` of the world re-rendered with one attribute changed each; nothing
    for a key that is not the example of that caption (another world seed, another source)."""
    rng = np.random.default_rng(0)
    for i in range(40):
        image, text = S.make_example(i, seed=0)
        wrong = S.wrong_images(f"{i:09d}", text, 4, rng)
        assert len(wrong) == min(4, len(S.perturbable(S.sample_scene(np.random.default_rng([0, i])))))
        for w in wrong:
            assert not np.array_equal(np.asarray(w), np.asarray(image))  # a different picture ...
            assert S.check(image, text) and not S.check(w, text)         # ... that its caption no longer describes
    assert S.wrong_images("000000007", S.make_example(8)[1], 2, rng) == []   # caption of another example
    assert S.wrong_images("000000007", S.make_example(7, seed=1)[1], 2, rng) == []  # another world seed
    assert S.wrong_images("cat_0001", "a small red circle", 2, rng) == []
    assert S.wrong_images("000000007", S.make_example(7)[1], 0, rng) == []
