"""Caption accuracy on the shapes world, taken apart so that every failure has a name.

`caption_report` turns the pixel check of N candidates per prompt into the figures that judge the generator and
the reranker separately (DALL-E section 2.6: sample many, keep the one CLIP likes best):

  per_candidate      fraction of all candidates that satisfy their caption (the generator alone)
  oracle             fraction of prompts with at least one correct candidate (what a perfect reranker could keep)
  top1[<ranking>]    fraction of prompts whose best-ranked candidate is correct (CLIP, likelihood, sampling order)
  rerank_efficiency  top1 / oracle per ranking: how often the reranker finds a correct candidate when one exists
  pairwise           per ranking, over pairs (correct candidate, wrong candidate) of one prompt: how often the ranking
                     puts the correct one first ("all"), and by what the wrong one gets wrong when it is one attribute
                     (e.g. "shape") or "several": which mistakes the reranker cannot see (0.5 is chance)
  attributes         per attribute (colour, shape, size, count, position, relation): fraction of candidates right
                     about it (`synthetic.attributes`), so a failure is named, not just counted
  by_objects         the same figures for one-object and two-object prompts

`clip_discrimination` is the test a CLIP must pass before its scores mean anything here: for held-out scenes it
compares the CLIP's cosine for the caption against a render of the scene and a render of the scene with one
attribute changed (`synthetic.perturb`); the pairwise accuracy is how often the true render wins. Its `binding`
part does the same against two-shape scenes with their colours or kinds swapped between the shapes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from dalle_ar.data import synthetic


def _summary(passed: np.ndarray, orders: Mapping[str, np.ndarray], attrs: Sequence[Sequence[dict]]) -> dict:
    """passed (P, N) bool; orders name -> (P, N) candidate indices best first; attrs[p][n] attribute verdicts."""
    oracle = float(passed.any(axis=1).mean())
    top1 = {name: float(passed[np.arange(len(passed)), order[:, 0]].mean()) for name, order in orders.items()}
    per_attribute: dict[str, list[bool]] = {}
    for row in attrs:
        for verdict in row:
            for name, ok in verdict.items():
                per_attribute.setdefault(name, []).append(bool(ok))
    return {
        "prompts": int(passed.shape[0]), "candidates": int(passed.size),
        "per_candidate": float(passed.mean()), "oracle": oracle, "top1": top1,
        "rerank_efficiency": {name: (acc / oracle if oracle else None) for name, acc in top1.items()},
        "pairwise": {name: _pairwise(passed, order, attrs) for name, order in orders.items()},
        "attributes": {name: float(np.mean(v)) for name, v in sorted(per_attribute.items(),
                                                                      key=lambda kv: synthetic.ATTRIBUTES.index(kv[0]))},
    }


def _pairwise(passed: np.ndarray, order: np.ndarray, attrs: Sequence[Sequence[dict]]) -> dict:
    """{"all" | <the one attribute a wrong candidate gets wrong> | "several": {"accuracy", "pairs"}}: over the
    (correct, wrong) candidate pairs of each prompt, how often `order` ranks the correct one first."""
    position = np.argsort(order, axis=1)  # position[p, n]: where candidate n comes in prompt p's order
    wins: dict[str, list[bool]] = {"all": []}
    for p in range(len(passed)):
        good = np.flatnonzero(passed[p])
        for bad in np.flatnonzero(~passed[p]):
            wrong = [name for name, ok in attrs[p][bad].items() if not ok]
            first = (position[p, good] < position[p, bad]).tolist()
            wins["all"] += first
            wins.setdefault(wrong[0] if len(wrong) == 1 else "several", []).extend(first)
    return {key: {"accuracy": float(np.mean(v)) if v else None, "pairs": len(v)} for key, v in wins.items()}


def caption_report(images: torch.Tensor | Sequence, prompts: Sequence[str],
                   orders: Mapping[str, torch.Tensor | np.ndarray]) -> dict:
    """`images` (P, N, 3, H, W) in [0, 1] for shapes-world `prompts` (P); `orders` maps a ranking name (e.g. "clip",
    "likelihood", "sampling") to its (P, N) candidate order, best first. Returns the summary above plus the per-
    candidate verdicts (`check` (P, N) and `attributes` [P][N])."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} prompts of images but {len(prompts)} prompts")
    attrs = [[synthetic.attributes(image, prompt) for image in cands] for cands, prompt in zip(images, prompts)]
    passed = np.array([[all(v.values()) for v in row] for row in attrs], dtype=bool)
    orders = {name: np.asarray(order, dtype=np.int64).reshape(passed.shape) for name, order in orders.items()}
    report = _summary(passed, orders, attrs)
    objects = np.array([len(synthetic.parse_caption(p).shapes) for p in prompts])
    report["by_objects"] = {str(k): _summary(passed[objects == k], {n: o[objects == k] for n, o in orders.items()},
                                             [a for a, m in zip(attrs, objects == k) if m])
                            for k in (1, 2) if (objects == k).any()}
    report["check"] = passed.tolist()
    report["attribute_verdicts"] = attrs
    return report


@torch.no_grad()
def clip_discrimination(scorer, num_scenes: int = 256, seed: int = synthetic.HELDOUT_SEED,
                        image_size: int = 64) -> dict:
    """Pairwise accuracy of a CLIP (`clip.ClipScorer`) on the shapes world: for each held-out scene (world `seed`,
    not the training seed) and each attribute it can change, is cos(render(scene), caption) greater than
    cos(render(scene with that attribute changed), caption)? Returns the overall accuracy, per attribute, and the
    number of pairs; and apart, under `binding`, the same test against renders of the two-shape scenes with their
    colours or kinds swapped (`synthetic.swap`: the same words, bound to the other shape), which a CLIP that sees
    which attributes are present but not which shape has which cannot pass."""
    wins: dict[str, list[bool]] = {}
    binding: dict[str, list[bool]] = {}
    rng = np.random.default_rng([seed, 1])
    for i in range(num_scenes):
        scene = synthetic.example_scene(i, seed)
        text = synthetic.caption(scene)
        names = synthetic.perturbable(scene)
        renders = [synthetic.render(scene, image_size)] + [synthetic.render(synthetic.perturb(scene, a, rng), image_size)
                                                           for a in names]
        batch = torch.stack([_tensor(im) for im in renders])
        cos = scorer.scores(batch, [text])[:, 0].float().cpu()
        for k, name in enumerate(names):
            wins.setdefault(name, []).append(bool(cos[0] > cos[k + 1]))
        swaps = synthetic.swappable(scene)
        if swaps:  # a batch of their own: the one-attribute cosines stay those measured before binding was added
            batch = torch.stack([_tensor(synthetic.render(synthetic.swap(scene, a), image_size)) for a in swaps])
            swapped = scorer.scores(batch, [text])[:, 0].float().cpu()
            for k, name in enumerate(swaps):
                binding.setdefault(name, []).append(bool(cos[0] > swapped[k]))
    every = [w for v in wins.values() for w in v]
    bound = [w for v in binding.values() for w in v]
    return {"pairwise_accuracy": float(np.mean(every)), "pairs": len(every), "scenes": num_scenes, "seed": seed,
            "per_attribute": {name: float(np.mean(v)) for name, v in wins.items()},
            "binding": {"pairwise_accuracy": float(np.mean(bound)) if bound else None, "pairs": len(bound),
                        "per_swap": {name: float(np.mean(v)) for name, v in binding.items()}}}


def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
