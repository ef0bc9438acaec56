"""The built-in "shapes world": synthetic image/caption pairs that can be checked from pixels.

The world is deliberately tiny so that a text-to-image model trained on it can be scored
automatically, without a human or a CLIP model in the loop:

* A dark gray background (``BACKGROUND``) with one or two flat-coloured shapes on it.
* Each shape has a colour (``COLORS``), a kind (``SHAPES``), a size (``SIZES``) and a centre.
* One shape: the caption names where it sits ("on the left", "at the top", ...).
  Two shapes: they always have different colours and the caption names how the first one sits
  relative to the second ("to the left of", "above", ...). Scenes are sampled so that the named
  axis clearly dominates and the shapes never touch, which keeps every caption unambiguous.

Caption grammar (lower case, no trailing period)::

    caption   := phrase [" " position] | phrase " " relation " " phrase
    phrase    := "a " size " " colour " " shape
    position  := "on the left" | "on the right" | "at the top" | "at the bottom"
    relation  := "to the left of" | "to the right of" | "above" | "below"

e.g. "a small red circle on the left", "a large blue square to the left of a small green triangle".
``sample_scene`` always produces a position for single shapes; a caption without one is still
valid input for ``parse_caption`` and ``check`` (position is then not verified).

Geometry is defined in relative units (fractions of the image side), so a 256 px render is a
scaled 64 px render. ``check`` verifies an image against a caption from pixels only: pixels are
snapped to the nearest palette colour (or ignored when far from all of them), each colour's
connected blobs are measured, and every named shape must appear exactly once with the right
kind (best-matching ideal template), size class and position. It is meant to tolerate the
degradation a generative model produces (blur, JPEG, speckles, slight colour drift) while
rejecting captions that get a colour, shape, size or spatial word wrong.

Depends on numpy and Pillow only; torch tensors are accepted duck-typed.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

# Saturated colours chosen to be far apart in RGB (closest pair, orange/yellow, is ~90 apart) and
# far from the background, so snapping pixels to the palette survives blur, JPEG and drift.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (50, 190, 70),
    "blue": (50, 100, 235),
    "yellow": (240, 230, 50),
    "purple": (160, 60, 210),
    "orange": (245, 145, 30),
}
BACKGROUND: tuple[int, int, int] = (40, 40, 40)

# Kinds are told apart by overlap with ideal templates. A diamond was tried and dropped: once
# blurred at 64 px its tips fade and a small one becomes indistinguishable from a circle.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")

# Single-shape position phrase -> (axis, sign); axis 0 is x (right is +), 1 is y (down is +).
POSITIONS: dict[str, tuple[int, int]] = {
    "on the left": (0, -1),
    "on the right": (0, +1),
    "at the top": (1, -1),
    "at the bottom": (1, +1),
}
# Two-shape relation phrase -> (axis, sign) of (first shape - second shape).
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, +1),
    "above": (1, -1),
    "below": (1, +1),
}

# ---------------------------------------------------------------------------------------------
# Geometry (fractions of the image side)
# ---------------------------------------------------------------------------------------------

# Bounding-box side of each size class: ~18 px and ~27 px at 64 px, i.e. 2-3 cells of an 8x
# downsampled token grid, big enough to survive tokenisation.
SIZE_FRAC: dict[str, float] = {"small": 0.28, "large": 0.42}
EDGE_MARGIN = 0.03  # keep shapes off the border so blur/JPEG edge effects don't clip them
MIN_GAP = 0.08  # empty space between two shapes along the relation axis (~5 px at 64 px)
POS_MIN_OFFSET = 0.15  # single shape: min distance of its centre from the image centre
PERP_RATIO_ONE = 0.4  # single shape: |off-axis offset| <= this * on-axis offset
PERP_RATIO_TWO = 0.3  # two shapes: |off-axis difference| <= this * on-axis separation


# ---------------------------------------------------------------------------------------------
# Scene description
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """What a caption says about one shape (no coordinates)."""

    color: str
    shape: str
    size: str


@dataclass(frozen=True)
class SceneSpec:
    """What a caption says about a scene: the output of ``parse_caption``."""

    shapes: tuple[ShapeSpec, ...]
    relation: str | None  # position phrase (1 shape), relation phrase (2 shapes), or None


@dataclass(frozen=True)
class Shape:
    color: str
    shape: str
    size: str
    x: float  # centre of the bounding box, in [0, 1], left -> right
    y: float  # centre of the bounding box, in [0, 1], top -> bottom

    @property
    def spec(self) -> ShapeSpec:
        return ShapeSpec(self.color, self.shape, self.size)


@dataclass(frozen=True)
class Scene:
    """One or two shapes. ``relation`` is the single shape's position phrase, or how
    ``shapes[0]`` sits relative to ``shapes[1]``."""

    shapes: tuple[Shape, ...]
    relation: str | None

    @property
    def spec(self) -> SceneSpec:
        return SceneSpec(tuple(s.spec for s in self.shapes), self.relation)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options) -> str:
    # Index rather than rng.choice so we return a plain str, not numpy.str_.
    return options[int(rng.integers(len(options)))]


def _centre_range(size: str) -> tuple[float, float]:
    """Allowed centre coordinates that keep a shape of this size inside the margins."""
    r = SIZE_FRAC[size] / 2
    return EDGE_MARGIN + r, 1.0 - EDGE_MARGIN - r


def _sample_one(rng: np.random.Generator) -> Scene:
    color, kind, size = _pick(rng, list(COLORS)), _pick(rng, SHAPES), _pick(rng, SIZES)
    position = _pick(rng, list(POSITIONS))
    axis, sign = POSITIONS[position]
    lo, hi = _centre_range(size)
    main = 0.5 + sign * rng.uniform(POS_MIN_OFFSET, 0.5 - lo)
    # Off-axis drift is bounded relative to the on-axis offset so the named side clearly wins.
    perp_max = min(PERP_RATIO_ONE * abs(main - 0.5), 0.5 - lo)
    perp = 0.5 + rng.uniform(-perp_max, perp_max)
    x, y = (main, perp) if axis == 0 else (perp, main)
    return Scene((Shape(color, kind, size, float(x), float(y)),), position)


def _sample_two(rng: np.random.Generator) -> Scene:
    colors = list(COLORS)
    i = int(rng.integers(len(colors)))
    j = (i + 1 + int(rng.integers(len(colors) - 1))) % len(colors)  # distinct from i
    specs = [ShapeSpec(colors[c], _pick(rng, SHAPES), _pick(rng, SIZES)) for c in (i, j)]
    relation = _pick(rng, list(RELATIONS))
    axis, sign = RELATIONS[relation]

    # Along the axis: order the pair so that "low" has the smaller coordinate.
    low, high = (0, 1) if sign < 0 else (1, 0)
    lo_low, _ = _centre_range(specs[low].size)
    _, hi_high = _centre_range(specs[high].size)
    need = (SIZE_FRAC[specs[0].size] + SIZE_FRAC[specs[1].size]) / 2 + MIN_GAP
    sep = rng.uniform(need, hi_high - lo_low)  # feasible for all sizes with the constants above
    main = [0.0, 0.0]
    main[low] = rng.uniform(lo_low, hi_high - sep)
    main[high] = main[low] + sep

    # Across the axis: close enough that the relation axis clearly dominates.
    lo0, hi0 = _centre_range(specs[0].size)
    lo1, hi1 = _centre_range(specs[1].size)
    perp0 = rng.uniform(lo0, hi0)
    d = PERP_RATIO_TWO * sep
    perp1 = rng.uniform(max(lo1, perp0 - d), min(hi1, perp0 + d))
    perp = [perp0, perp1]

    shapes = []
    for k, s in enumerate(specs):
        x, y = (main[k], perp[k]) if axis == 0 else (perp[k], main[k])
        shapes.append(Shape(s.color, s.shape, s.size, float(x), float(y)))
    return Scene(tuple(shapes), relation)


def sample_scene(rng: np.random.Generator, max_shapes: int = 2, p_two: float = 0.5) -> Scene:
    """Sample a random scene with one shape, or two with probability ``p_two``."""
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    if max_shapes == 2 and rng.random() < p_two:
        return _sample_two(rng)
    return _sample_one(rng)


# Each position and relation phrase and its mirror image along its axis.
_MIRRORED = (("on the left", "on the right"), ("at the top", "at the bottom"), ("to the left of", "to the right of"),
             ("above", "below"))
OPPOSITE: dict[str, str] = {a: b for pair in _MIRRORED for a, b in (pair, pair[::-1])}


def perturbable(scene: Scene | SceneSpec) -> tuple[str, ...]:
    """The attributes ``perturb`` can change in this scene: colour, shape, size, and position (one shape) or
    relation (two shapes) when the caption names one."""
    spatial = () if scene.relation is None else ("position",) if len(scene.shapes) == 1 else ("relation",)
    return ("colour", "shape", "size", *spatial)


def perturb(scene: Scene | SceneSpec, attribute: str, rng: np.random.Generator) -> Scene | SceneSpec:
    """The scene with exactly one ``attribute`` changed: one shape's colour (to a colour not in the scene), kind or
    size, or the position/relation (the scene mirrored along the named axis). Works on a ``SceneSpec`` (its caption is
    a one-word-wrong caption: a hard negative for CLIP) and on a ``Scene`` (a render of it is a one-word-wrong image:
    the evaluator CLIP's discrimination test)."""
    if attribute not in perturbable(scene):
        raise ValueError(f"cannot change {attribute!r} of {caption(scene)!r}; use one of {perturbable(scene)}")
    if attribute in ("position", "relation"):
        if isinstance(scene, SceneSpec):
            return SceneSpec(scene.shapes, OPPOSITE[scene.relation])
        axis = (POSITIONS if len(scene.shapes) == 1 else RELATIONS)[scene.relation][0]
        mirrored = tuple(dataclasses.replace(s, **({"x": 1 - s.x} if axis == 0 else {"y": 1 - s.y})) for s in scene.shapes)
        return Scene(mirrored, OPPOSITE[scene.relation])
    k = int(rng.integers(len(scene.shapes)))
    target = scene.shapes[k]
    if attribute == "colour":
        unused = [c for c in COLORS if c not in {s.color for s in scene.shapes}]
        change = {"color": _pick(rng, unused)}
    elif attribute == "shape":
        change = {"shape": _pick(rng, [s for s in SHAPES if s != target.shape])}
    else:
        change = {"size": "large" if target.size == "small" else "small"}
        if isinstance(target, Shape):  # keep the resized shape inside the margins
            lo, hi = _centre_range(change["size"])
            change.update(x=float(np.clip(target.x, lo, hi)), y=float(np.clip(target.y, lo, hi)))
    shapes = tuple(dataclasses.replace(s, **change) if i == k else s for i, s in enumerate(scene.shapes))
    return type(scene)(shapes, scene.relation)


def swappable(scene: Scene | SceneSpec) -> tuple[str, ...]:
    """The attributes ``swap`` can exchange between a scene's two shapes: colour when the shapes differ in kind or
    size (so the swap changes which shape wears which colour, not just where), shape when their kinds differ. Empty
    for one shape."""
    if len(scene.shapes) != 2:
        return ()
    a, b = scene.shapes
    return (("colour",) if (a.shape, a.size) != (b.shape, b.size) else ()) + (("shape",) if a.shape != b.shape else ())


def swap(scene: Scene | SceneSpec, attribute: str) -> Scene | SceneSpec:
    """The two-shape scene with ``attribute`` (colour or shape) exchanged between its shapes, each staying where it is.
    Its caption has the same words in another order: only a model that binds attributes to objects tells the two
    apart (what the unCLIP paper finds CLIP image embeddings weak at, in its section on limitations)."""
    if attribute not in swappable(scene):
        raise ValueError(f"cannot swap {attribute!r} in {caption(scene)!r}; use one of {swappable(scene)}")
    key = "color" if attribute == "colour" else "shape"
    a, b = scene.shapes
    shapes = (dataclasses.replace(a, **{key: getattr(b, key)}), dataclasses.replace(b, **{key: getattr(a, key)}))
    return type(scene)(shapes, scene.relation)


def wrong_captions(text: str, k: int, rng: np.random.Generator) -> list[str]:
    """Up to ``k`` captions that are each wrong about one attribute of ``text`` (distinct attributes, chosen at
    random): hard negatives for contrastive training. Empty for text that is not a shapes-world caption."""
    if k <= 0 or not is_caption(text):
        return []
    spec = parse_caption(text)
    names = perturbable(spec)
    chosen = rng.permutation(len(names))[:k]
    return [caption(perturb(spec, names[int(i)], rng)) for i in chosen]


def variants(text: str) -> list[tuple[str, str]]:
    """Every caption wrong about exactly one attribute of ``text``, as (attribute, caption): each shape in every colour
    not in the scene, as the other kinds, at the other size, then the position or relation mirrored. Deterministic,
    in that order (``perturb`` draws one of them at random). Empty for text that is not a shapes-world caption."""
    if not is_caption(text):
        return []
    spec = parse_caption(text)
    used = {s.color for s in spec.shapes}
    out = []
    for k, s in enumerate(spec.shapes):
        changes = ([("colour", {"color": c}) for c in COLORS if c not in used]
                   + [("shape", {"shape": kind}) for kind in SHAPES if kind != s.shape]
                   + [("size", {"size": "large" if s.size == "small" else "small"})])
        for attribute, change in changes:
            shapes = tuple(dataclasses.replace(t, **change) if i == k else t for i, t in enumerate(spec.shapes))
            out.append((attribute, caption(SceneSpec(shapes, spec.relation))))
    if spec.relation is not None:
        out.append(("position" if len(spec.shapes) == 1 else "relation",
                    caption(SceneSpec(spec.shapes, OPPOSITE[spec.relation]))))
    return out


def _shard_scene(key: str, text: str, seed: int, max_shapes: int, p_two: float) -> Scene | None:
    """The scene of example ``key`` of the world ``seed``, or None unless ``key`` is that example's index and its
    caption is ``text`` (a shard of another world or source)."""
    if not str(key).isdigit():
        return None
    scene = example_scene(int(key), seed, max_shapes, p_two)
    return scene if caption(scene) == text else None


def wrong_images(key: str, text: str, k: int, rng: np.random.Generator, seed: int = 0, image_size: int = 64,
                 max_shapes: int = 2, p_two: float = 0.5) -> list[Image.Image]:
    """Up to ``k`` renders of example ``key`` of the world ``seed`` (``make_example``'s arguments; the shards of
    make_shards.py synthetic record them in stats.json) with one attribute changed each (distinct attributes): hard
    negative images for its caption. Empty unless ``key`` is that example's index and its scene's caption is ``text``."""
    scene = _shard_scene(key, text, seed, max_shapes, p_two) if k > 0 else None
    if scene is None:
        return []
    names = perturbable(scene)
    return [render(perturb(scene, names[int(i)], rng), image_size) for i in rng.permutation(len(names))[:k]]


MORPH_RANGE = (0.3, 0.8)  # how far `morph_images` draws a shape toward another kind: in between, as generators do


def morph_images(key: str, text: str, k: int, rng: np.random.Generator, seed: int = 0, image_size: int = 64,
                 max_shapes: int = 2, p_two: float = 0.5) -> list[Image.Image]:
    """Up to ``k`` renders of example ``key`` (as ``wrong_images``) in which one shape is drawn part of the way (a
    fraction in ``MORPH_RANGE``) toward another kind: a rounded square, a squashed circle. Hard negative images for its
    caption that differ from the right image less than ``wrong_images`` do, as a generator's borderline shapes do: a
    CLIP that must rank them below the clean render learns to prefer the shape closest to the named kind."""
    scene = _shard_scene(key, text, seed, max_shapes, p_two) if k > 0 else None
    if scene is None:
        return []
    out = []
    for _ in range(k):
        i = int(rng.integers(len(scene.shapes)))
        kind = _pick(rng, [s for s in SHAPES if s != scene.shapes[i].shape])
        out.append(render(scene, image_size, {i: (kind, float(rng.uniform(*MORPH_RANGE)))}))
    return out


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _unit_mask(kind: str, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Inside-test for a shape whose bounding box is [-1, 1]^2 (dv grows downwards)."""
    if kind == "circle":
        return du * du + dv * dv <= 1.0
    if kind == "square":
        return (np.abs(du) <= 1.0) & (np.abs(dv) <= 1.0)
    if kind == "triangle":  # apex up, base at the bottom: half-width grows from 0 to 1
        return (dv <= 1.0) & (np.abs(du) <= (dv + 1.0) / 2)
    raise ValueError(f"unknown shape {kind!r}")


def _unit_field(kind: str, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """A field that is <= 0 inside the shape of ``_unit_mask`` and grows outwards (the distance to its outline for the
    circle and square, near it for the triangle): blending two kinds' fields morphs one shape into the other."""
    if kind == "circle":
        return np.sqrt(du * du + dv * dv) - 1.0
    if kind == "square":
        return np.maximum(np.abs(du), np.abs(dv)) - 1.0
    if kind == "triangle":
        return np.maximum(dv - 1.0, np.abs(du) - (dv + 1.0) / 2)
    raise ValueError(f"unknown shape {kind!r}")


def render(scene: Scene, image_size: int = 64, morphs: dict[int, tuple[str, float]] | None = None) -> Image.Image:
    """Rasterise ``scene`` as an RGB image with flat colours (no anti-aliasing).

    Pixels are sampled at their centres against the analytic shape, so any image size gives the
    same picture up to resolution. ``morphs`` {i: (kind, t)} draws shape i a fraction t of the way to ``kind``
    (t = 0: itself, 1: that kind) in the same bounding box: the in-between shapes a generator draws.
    """
    n = image_size
    morphs = morphs or {}
    img = np.empty((n, n, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for i, s in enumerate(scene.shapes):
        r = SIZE_FRAC[s.size] / 2
        # Only the pixels in the shape's bounding box can be inside it.
        c0, c1 = max(0, int((s.x - r) * n)), min(n, int(np.ceil((s.x + r) * n)))
        r0, r1 = max(0, int((s.y - r) * n)), min(n, int(np.ceil((s.y + r) * n)))
        u = ((np.arange(c0, c1) + 0.5) / n - s.x) / r  # pixel centres, in units of r
        v = ((np.arange(r0, r1) + 0.5) / n - s.y) / r
        du, dv = np.meshgrid(u, v)
        if i in morphs:
            kind, t = morphs[i]
            inside = (1 - t) * _unit_field(s.shape, du, dv) + t * _unit_field(kind, du, dv) <= 0
        else:
            inside = _unit_mask(s.shape, du, dv)
        img[r0:r1, c0:c1][inside] = COLORS[s.color]
    return Image.fromarray(img, "RGB")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _phrase(s: Shape | ShapeSpec) -> str:
    return f"a {s.size} {s.color} {s.shape}"


def caption(scene: Scene | SceneSpec) -> str:
    """The canonical caption of a scene (see the module docstring for the grammar)."""
    if len(scene.shapes) == 1:
        text = _phrase(scene.shapes[0])
        return f"{text} {scene.relation}" if scene.relation else text
    if len(scene.shapes) == 2:
        a, b = scene.shapes
        return f"{_phrase(a)} {scene.relation} {_phrase(b)}"
    raise ValueError(f"a scene has 1 or 2 shapes, got {len(scene.shapes)}")


def _alternation(words) -> str:
    # Longest first so e.g. "to the left of" is never cut short by a shorter alternative.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE_RE = rf"a ({_alternation(SIZES)}) ({_alternation(COLORS)}) ({_alternation(SHAPES)})"
_ONE_RE = re.compile(rf"{_PHRASE_RE}(?: ({_alternation(POSITIONS)}))?")
_TWO_RE = re.compile(rf"{_PHRASE_RE} ({_alternation(RELATIONS)}) {_PHRASE_RE}")


def parse_caption(text: str) -> SceneSpec:
    """Inverse of ``caption`` (without coordinates). Case, extra spaces and a trailing period
    are tolerated; anything else outside the grammar raises ``ValueError``."""
    norm = " ".join(str(text).lower().strip().rstrip(".").split())
    if m := _TWO_RE.fullmatch(norm):
        size_a, color_a, kind_a, relation, size_b, color_b, kind_b = m.groups()
        if color_a == color_b:
            raise ValueError(f"the two shapes must have different colours: {text!r}")
        shapes = (ShapeSpec(color_a, kind_a, size_a), ShapeSpec(color_b, kind_b, size_b))
        return SceneSpec(shapes, relation)
    if m := _ONE_RE.fullmatch(norm):
        size, color, kind, position = m.groups()
        return SceneSpec((ShapeSpec(color, kind, size),), position)
    raise ValueError(
        f"not a shapes-world caption: {text!r} (expected e.g. 'a small red circle on the left' "
        f"or 'a large blue square above a small green triangle'; sizes {SIZES}, "
        f"colours {tuple(COLORS)}, shapes {SHAPES})"
    )


def is_caption(text: str) -> bool:
    """True if `text` is a shapes-world caption (so `check` can verify an image against it)."""
    try:
        parse_caption(text)
        return True
    except ValueError:
        return False


def example_scene(index: int, seed: int = 0, max_shapes: int = 2, p_two: float = 0.5) -> Scene:
    """The scene of example ``index`` of dataset ``seed`` (what ``make_example`` renders and captions)."""
    return sample_scene(np.random.default_rng([seed, index]), max_shapes, p_two)


def make_example(
    index: int, seed: int = 0, image_size: int = 64, max_shapes: int = 2, p_two: float = 0.5
) -> tuple[Image.Image, str]:
    """The ``index``-th example of dataset ``seed``; a pure function of its arguments."""
    scene = example_scene(index, seed, max_shapes, p_two)
    return render(scene, image_size), caption(scene)


HELDOUT_SEED = 12345  # the world seed of held-out prompts and images (sample/generate.py --synthetic_seed); training uses 0


def heldout(n: int, image_size: int = 64) -> list[tuple[Image.Image, str]]:
    """The first `n` held-out examples (the prompts sample/generate.py --synthetic_prompts uses)."""
    return [make_example(i, seed=HELDOUT_SEED, image_size=image_size) for i in range(n)]


def heldout_captions(n: int) -> list[str]:
    """The captions of `heldout(n)`, without rendering. Their scenes come from the held-out world seed, not the
    training shards'; the captions themselves mostly recur in training (55 of the first 64 caption one of the
    demo's 8,000 training examples)."""
    return [caption(example_scene(i, HELDOUT_SEED)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------

ANALYSIS_SIZE = 64  # larger images are box-downsampled first: faster and it averages out noise
COLOR_TOL = 60.0  # max RGB distance from the nearest background->colour segment
MIN_BLOB_FRAC = 0.015  # ~40% of the smallest shape's area (small triangle ~0.039 of the image)
MIN_IOU = 0.6  # a blob must overlap its best ideal template at least this much
SIZE_SPLIT = 0.35  # bbox side fraction between small (0.28) and large (0.42)
SIZE_RANGE = (0.16, 0.62)  # plausible bbox side fractions for any shape
MAX_ASPECT = 1.6  # every shape has a square bounding box; allow some squashing
CHECK_POS_OFFSET = 0.07  # single shape: on-axis offset must exceed this (generated >= 0.15)
CHECK_REL_SEP = 0.15  # two shapes: on-axis separation must exceed this (generated >= 0.36)


@dataclass(frozen=True)
class Blob:
    """A connected region of one palette colour, in analysis-grid units."""

    color: str
    area: int
    top: int
    left: int
    mask: np.ndarray  # bool crop of the bounding box
    image_hw: tuple[int, int]  # analysis image size, to turn pixels into fractions

    @property
    def height(self) -> int:
        return self.mask.shape[0]

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def centre(self) -> tuple[float, float]:
        """Bounding-box centre as image fractions (matches ``Shape.x``/``Shape.y``)."""
        h, w = self.image_hw
        return (self.left + self.width / 2) / w, (self.top + self.height / 2) / h

    @property
    def side(self) -> float:
        """Longer bounding-box side as an image fraction (compare with ``SIZE_FRAC``)."""
        h, w = self.image_hw
        return max(self.height / h, self.width / w)


def _to_uint8_rgb(image) -> np.ndarray:
    """HxWx3 uint8 array, or float (3,H,W)/(H,W,3) array/tensor in [0, 1]."""
    if hasattr(image, "detach"):  # torch tensor, without importing torch
        t = image.detach().cpu()
        try:
            image = t.numpy()
        except TypeError:  # e.g. bfloat16 has no numpy dtype
            image = t.float().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected an RGB image with 3 dimensions, got shape {arr.shape}")
    if arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    arr = arr[..., :3]
    if arr.dtype.kind == "f":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 + 0.5
    return np.clip(arr, 0, 255).astype(np.uint8)


def _analysis_image(image) -> np.ndarray:
    im = image if isinstance(image, Image.Image) else Image.fromarray(_to_uint8_rgb(image))
    im = im.convert("RGB")
    if max(im.size) > ANALYSIS_SIZE:
        scale = ANALYSIS_SIZE / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32)


_PALETTE_NAMES = list(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array(list(COLORS.values()), dtype=np.float32) - _BG  # background -> colour
_DIR_NORM2 = (_DIRS * _DIRS).sum(-1)


def _classify_pixels(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel palette index: 0 background/ignored, k>0 is colour ``_PALETTE_NAMES[k-1]``.

    Blur and JPEG turn shape edges into blends of background and shape colour, i.e. points on
    the segment background -> colour. A pixel belongs to the colour whose segment it lies
    closest to, if it is near that segment and at least halfway along it. Cutting at the 50%
    blend keeps a blurred shape's measured extent equal to the original one, and blends of a
    colour with the background never get mistaken for a different colour.
    """
    rel = rgb - _BG  # (H, W, 3)
    dot = rel @ _DIRS.T  # (H, W, K)
    t = dot / _DIR_NORM2  # position along each segment, 0 = background, 1 = colour
    tc = np.clip(t, 0.0, 1.0)
    # |rel - tc * d|^2 expanded, to avoid materialising an (H, W, K, 3) array.
    dist2 = (rel * rel).sum(-1, keepdims=True) - 2 * tc * dot + tc * tc * _DIR_NORM2
    k = dist2.argmin(-1)
    t_k = np.take_along_axis(t, k[..., None], -1)[..., 0]
    d2_k = np.take_along_axis(dist2, k[..., None], -1)[..., 0]
    keep = (d2_k <= COLOR_TOL**2) & (t_k >= 0.5)
    return np.where(keep, k + 1, 0)


def _label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-zero class; returns labels (-1 for background).

    Min-label propagation with pointer jumping (numpy only, no scipy): each pixel's label is the
    flat index of some pixel of its component, so following labels converges in a few rounds.
    """
    h, w = classes.shape
    big = h * w
    fg = classes > 0
    same_h = (classes[:, 1:] == classes[:, :-1]) & fg[:, 1:]  # edge to the left neighbour
    same_v = (classes[1:] == classes[:-1]) & fg[1:]  # edge to the upper neighbour
    labels = np.where(fg, np.arange(big).reshape(h, w), big)
    while True:
        new = labels.copy()
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[1:] = np.where(same_v, np.minimum(new[1:], labels[:-1]), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], labels[1:]), new[:-1])
        new = np.where(fg, new.ravel()[np.minimum(new, big - 1)], big)  # pointer jump
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def find_blobs(image) -> list[Blob]:
    """All palette-coloured blobs large enough to be a shape, largest first."""
    rgb = _analysis_image(image)
    classes = _classify_pixels(rgb)
    labels = _label_components(classes)
    min_area = MIN_BLOB_FRAC * classes.shape[0] * classes.shape[1]
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    blobs = []
    for lab, area in zip(ids, counts):
        if area < min_area:  # speckle
            continue
        rows, cols = np.nonzero(labels == lab)
        top, left = rows.min(), cols.min()
        mask = labels[top : rows.max() + 1, left : cols.max() + 1] == lab
        color = _PALETTE_NAMES[classes[rows[0], cols[0]] - 1]
        blobs.append(Blob(color, int(area), int(top), int(left), mask, classes.shape))
    return sorted(blobs, key=lambda b: -b.area)


def classify_shape(blob: Blob) -> tuple[str, float]:
    """Best-matching ideal shape drawn in the blob's bounding box, and its IoU."""
    h, w = blob.mask.shape
    du = ((np.arange(w) + 0.5) / w * 2 - 1)[None, :]
    dv = ((np.arange(h) + 0.5) / h * 2 - 1)[:, None]
    du, dv = np.broadcast_arrays(du, dv)
    best, best_iou = "", -1.0
    for kind in SHAPES:
        template = _unit_mask(kind, du, dv)
        iou = (template & blob.mask).sum() / max(1, (template | blob.mask).sum())
        if iou > best_iou:
            best, best_iou = kind, float(iou)
    return best, best_iou


def _shape_problems(spec: ShapeSpec, blob: Blob) -> list[tuple[str, str]]:
    """(attribute, reason) for each way the blob differs from what the caption says of its shape."""
    problems = []
    side = blob.side
    if not SIZE_RANGE[0] <= side <= SIZE_RANGE[1]:
        problems.append(("size", f"{spec.color} blob has implausible size {side:.2f}"))
    elif ("large" if side > SIZE_SPLIT else "small") != spec.size:
        problems.append(("size", f"{spec.color} blob looks {'large' if side > SIZE_SPLIT else 'small'}"))
    if max(blob.height, blob.width) > MAX_ASPECT * min(blob.height, blob.width):
        problems.append(("shape", f"{spec.color} blob is too elongated ({blob.width}x{blob.height})"))
    kind, iou = classify_shape(blob)
    if iou < MIN_IOU:
        problems.append(("shape", f"{spec.color} blob matches no shape (best {kind}, IoU {iou:.2f})"))
    elif kind != spec.shape:
        problems.append(("shape", f"{spec.color} blob looks like a {kind} (IoU {iou:.2f})"))
    return problems


def _spatial_problems(spec: SceneSpec, blobs: list[Blob]) -> list[str]:
    if spec.relation is None:
        return []
    if len(blobs) == 1:
        axis, sign = POSITIONS[spec.relation]
        offset = np.array(blobs[0].centre) - 0.5
        threshold = CHECK_POS_OFFSET
    else:
        axis, sign = RELATIONS[spec.relation]
        offset = np.array(blobs[0].centre) - np.array(blobs[1].centre)
        threshold = CHECK_REL_SEP
    on_axis, off_axis = sign * offset[axis], abs(offset[1 - axis])
    # The named direction must be the dominant one, by a clear margin.
    if on_axis < threshold or off_axis >= on_axis:
        return [f"not {spec.relation!r}: offset (dx, dy) = ({offset[0]:+.2f}, {offset[1]:+.2f})"]
    return []


def _object_problems(spec: SceneSpec, blobs: list[Blob]) -> tuple[list[tuple[str, str]], list[Blob]]:
    """(attribute, reason) for everything but the spatial word, and the blob matched to each named shape."""
    problems, matched = [], []
    for s in spec.shapes:
        mine = [b for b in blobs if b.color == s.color]
        if not mine:
            problems.append(("colour", f"no {s.color} shape found"))
            continue
        if len(mine) > 1:
            problems.append(("count", f"{len(mine)} separate {s.color} blobs, expected one"))
        matched.append(mine[0])
        problems += _shape_problems(s, mine[0])
    named = {s.color for s in spec.shapes}
    extra = sorted({b.color for b in blobs} - named)
    if extra:
        problems.append(("colour", f"unexpected {', '.join(extra)} shape(s)"))
    return problems, matched


def diagnose(image, text: str) -> list[str]:
    """Reasons why ``image`` does not match caption ``text``; empty when it matches.

    Raises ``ValueError`` if ``text`` is not a shapes-world caption.
    """
    spec = parse_caption(text)
    tagged, matched = _object_problems(spec, find_blobs(image))
    problems = [reason for _, reason in tagged]
    if not problems:
        problems += _spatial_problems(spec, matched)
    return problems


# What a caption can get wrong, each judged on its own (``attributes``): the failure names of the caption check.
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "relation")


def attributes(image, text: str) -> dict[str, bool]:
    """Which parts of the caption ``image`` gets right, each judged on its own: ``colour`` (every named colour is
    there and no other), ``shape`` and ``size`` (of each named colour's blob), ``count`` (one blob per named colour),
    and ``position`` (one shape) or ``relation`` (two shapes), judged whenever every named colour has a blob. A
    missing object fails the attributes it carries. ``check`` is true exactly when all of them are."""
    spec = parse_caption(text)
    tagged, matched = _object_problems(spec, find_blobs(image))
    failed = {attribute for attribute, _ in tagged}
    if len(spec.shapes) != len(matched):  # a named shape is missing: its kind, size and place are wrong too
        failed |= {"shape", "size"}
    result = {a: a not in failed for a in ("colour", "shape", "size", "count")}
    if spec.relation is not None:
        spatial = "position" if len(spec.shapes) == 1 else "relation"
        result[spatial] = len(spec.shapes) == len(matched) and not _spatial_problems(spec, matched)
    return result


def check(image, text: str) -> bool:
    """True iff the image shows exactly what the shapes-world caption ``text`` says.

    ``image``: PIL image, HxWx3 uint8 array, or float (3,H,W)/(H,W,3) array or tensor with values
    in [0, 1] (map [-1, 1] model outputs to [0, 1] first). Raises ``ValueError`` on a text that
    is not a shapes-world caption. Use ``diagnose`` to see why an image fails.
    """
    return not diagnose(image, text)


def check_batch(images, texts) -> list[bool]:
    """``check`` over a batch; ``images`` may be a list or a (B,3,H,W)/(B,H,W,3) array/tensor."""
    images = list(images)
    texts = list(texts)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} captions")
    return [check(im, t) for im, t in zip(images, texts)]
