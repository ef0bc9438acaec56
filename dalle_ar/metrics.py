"""Numbers for comparing generators: feature-distance metrics (Frechet distance, KID), sample diversity,
bootstrap confidence intervals, compute accounting (parameters by stage, training FLOPs counted by
torch over one real step of the registry's example batch, `models.train_step`), and the check that the
evaluator CLIP is not the one being evaluated.

Features are whatever the caller passes, (N, D) arrays or tensors: sample/compare.py passes the image
embeddings of an *evaluator* CLIP (never the one used for reranking or conditioning), so no pretrained
Inception network (and no download) is involved. CLIP score itself is `dalle_ar.clip.clip_score`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from dalle_ar import models


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


# ------------------------------------------------------------------------------------------------
# feature-distance metrics
# ------------------------------------------------------------------------------------------------

def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, "FID" when the
    features are Inception's): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr((S_a S_b)^(1/2)) is computed as Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)): the same eigenvalues, but the
    matrix is symmetric PSD, so an eigendecomposition is exact and never goes complex (scipy's sqrtm of the
    non-symmetric product does, for near-singular covariances from few samples)."""
    a, b = _array(feats_a), _array(feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: feature widths differ ({a.shape[1]} vs {b.shape[1]})")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance: needs at least 2 samples per set (got {len(a)} and {len(b)})")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(fd, 0.0)  # rounding can leave -1e-15 for identical sets


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel (Binkowski et al. 2018): k(x, y) = (x.y / d + 1)^3."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel: the diagonals of k(x, x) and k(y, y) are left out."""
    m, n = len(x), len(y)
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000,
        generator: np.random.Generator | int | None = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD^2 averaged over `subsets` random subsets of `subset_size`
    from each set (drawn without replacement; capped at the smaller set). Returns (mean, std over subsets).
    Unlike FD it is unbiased in the number of samples, which matters with the few hundred images here."""
    a, b = _array(feats_a), _array(feats_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"kid: needs at least 2 samples per set (got {len(a)} and {len(b)})")
    rng = np.random.default_rng(generator)
    if m == len(a) == len(b):
        subsets = 1  # every subset is the whole of both sets
    vals = [mmd2_unbiased(a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)])
            for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def pairwise_distance_mean(feats, metric: str = "cosine") -> float:
    """Mean distance over all pairs i < j of one group: cosine distance 1 - cos(x_i, x_j) (in [0, 2]) or
    Euclidean distance."""
    x = _array(feats)
    n = len(x)
    if n < 2:
        raise ValueError(f"diversity: needs at least 2 samples per prompt (got {n})")
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        d = 1 - u @ u.T
    elif metric == "l2":
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    else:
        raise ValueError(f"diversity: metric {metric!r} is not 'cosine' or 'l2'")
    iu = np.triu_indices(n, k=1)
    return float(d[iu].mean())


def diversity(feats_per_prompt: Sequence, metric: str = "cosine") -> float:
    """Sample diversity: for each prompt, the mean pairwise distance among its samples' features (cosine
    distance by default, see `pairwise_distance_mean`), averaged over prompts. 0 = every prompt always gives
    the same image; it says nothing about whether the images are right (pair it with CLIP score)."""
    return float(np.mean([pairwise_distance_mean(f, metric) for f in feats_per_prompt]))


def bootstrap_ci(values, stat: Callable = np.mean, n: int = 1000, alpha: float = 0.05,
                 generator: np.random.Generator | int | None = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of `stat` over `values` resampled with replacement along
    the first axis (`values` may be per-item numbers or (N, D) features, e.g. stat = FD to a fixed set).
    The same generator seed gives the same interval."""
    rng = np.random.default_rng(generator)
    v = values if isinstance(values, (np.ndarray, torch.Tensor)) else np.asarray(values)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    stats = np.array([float(stat(v[i])) for i in idx])
    return float(np.quantile(stats, alpha / 2)), float(np.quantile(stats, 1 - alpha / 2))


# ------------------------------------------------------------------------------------------------
# compute accounting
# ------------------------------------------------------------------------------------------------

def count_params(stages: dict[str, nn.Module | None]) -> dict[str, int]:
    """Parameters per stage (None = stage absent) and their total."""
    out = {name: sum(p.numel() for p in m.parameters()) for name, m in stages.items() if m is not None}
    out["total"] = sum(out.values())
    return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as counted by torch.utils.flop_counter.FlopCounterMode (matmuls,
    convolutions, attention; forward and, when `fn` calls backward, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def training_flops(step_fn: Callable[[], object], steps: int) -> int:
    """Training compute of a run: FlopCounterMode over one real step (forward + backward) times `steps`.
    Elementwise work and the optimizer update are not counted (they are a few percent of a matmul-bound step)."""
    return count_flops(step_fn) * steps


def run_info(export_dir: str | Path) -> dict:
    """How long a run trained, from what it wrote next to its export (`<run>/export`): steps = the step of
    its latest checkpoint (`checkpoints/latest`; a run stopped early and exported), else the last step in
    metrics.jsonl, else train_config.json's `steps`; micro-batch, accumulation and data-parallel ranks from
    train_config.json (a run written before it recorded `world_size` counts as one rank; one resumed on another
    number of ranks counts all its steps at the last one). Missing files -> None. `run` is relative to the working
    directory when it lies under it (so a committed report names no machine's folders)."""
    run = Path(export_dir).resolve().parent
    shown = os.path.relpath(run) if run.is_relative_to(Path.cwd()) else str(run)
    cfg_path = run / "train_config.json"
    if not cfg_path.exists():
        return {"run": shown, "steps": None, "batch_size": None, "grad_accum": 1, "world_size": 1, "source": None}
    cfg = json.loads(cfg_path.read_text())
    steps, source = cfg.get("steps"), "train_config.json"
    metrics = run / "metrics.jsonl"
    if metrics.exists():
        logged = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
        if logged:
            steps, source = max(logged), "metrics.jsonl"
    latest = run / "checkpoints" / "latest"
    if latest.exists() and latest.read_text().strip().startswith("step_"):
        steps, source = int(latest.read_text().strip()[5:]), "checkpoints/latest"
    return {"run": shown, "steps": steps, "batch_size": cfg.get("batch_size"), "grad_accum": cfg.get("grad_accum", 1),
            "world_size": cfg.get("world_size", 1), "source": source}


def stage_training_flops(model: nn.Module, export_dir: str | Path, export_config: dict,
                         device: str | torch.device = "cpu") -> dict:
    """Training FLOPs of the run that produced `export_dir`: FlopCounterMode over one micro-batch step of
    its micro-batch, x gradient accumulation x data-parallel ranks x steps: `flops_per_step` is one optimizer
    step of the whole run. The model's weights are left as they were (gradients are dropped afterwards)."""
    info = run_info(export_dir)
    if not info["steps"] or not info["batch_size"]:
        return {**info, "flops_per_step": None, "flops": None}
    per_micro = count_flops(models.train_step(model, export_config, info["batch_size"], device))
    model.zero_grad(set_to_none=True)
    model.eval()
    per_step = per_micro * (info["grad_accum"] or 1) * (info["world_size"] or 1)
    return {**info, "flops_per_step": per_step, "flops": per_step * info["steps"]}


def plan_steps(budget: float, flops_per_step: dict[str, int], shares: dict[str, float] | None = None,
               spent: dict[str, int] | None = None) -> dict:
    """Optimizer steps per stage so that a backend's training FLOPs come to `budget` (train/train_matched.py
    --train-budget-flops). `flops_per_step` lists the stages to train, in order, with the FLOPs of one of
    their optimizer steps (`count_flops(models.train_step(...))` x gradient accumulation); `spent` the FLOPs of
    stages trained before (AR's dVAE), which count first. Every stage but the last gets
    floor(share x budget / flops_per_step) steps; the last gets floor(what is left / its flops_per_step).
    Steps are whole, so 0 <= budget - planned < the last stage's flops_per_step.

    Returns {"budget", "spent": {stage: flops}, "stages": {stage: {"steps", "flops_per_step", "flops"}},
    "flops" (spent + planned), "left" (budget - flops)}. Raises ValueError when the budget cannot pay for
    what was spent plus one step of every stage."""
    shares, spent = dict(shares or {}), dict(spent or {})
    names = list(flops_per_step)
    if not names:
        raise ValueError("plan_steps: no stage to train")
    *head, last = names
    if set(shares) != set(head):
        raise ValueError(f"plan_steps: shares must name every stage but the last ({head}), got {sorted(shares)}")
    if any(s <= 0 for s in shares.values()) or sum(shares.values()) >= 1:
        raise ValueError(f"plan_steps: shares {shares} must be > 0 and sum to less than 1 (the last stage, {last}, "
                         f"gets the rest)")
    if any(f <= 0 for f in flops_per_step.values()):
        raise ValueError(f"plan_steps: FLOPs per step must be > 0, got {flops_per_step}")
    used = sum(spent.values())
    if used + sum(flops_per_step.values()) > budget:
        given = " + ".join(f"{name} {f:.3g}" for name, f in spent.items())
        raise ValueError(f"budget {budget:.3g} FLOPs does not cover {given + ' (already trained) + ' if spent else ''}"
                         f"one step of each stage to train ({', '.join(f'{n} {f:.3g}' for n, f in flops_per_step.items())}); "
                         f"raise it to at least {used + sum(flops_per_step.values()):.3g}")
    stages = {}
    for name in names:
        fps = int(flops_per_step[name])
        steps = int((budget - used) // fps) if name == last else int(shares[name] * budget // fps)
        if steps < 1:
            part = "what the other stages leave" if name == last else f"share {shares[name]:g}"
            raise ValueError(f"{part} of the budget {budget:.3g} FLOPs is less than one {name} step ({fps:.3g} "
                             f"FLOPs); raise the budget or change the shares")
        stages[name] = {"steps": steps, "flops_per_step": fps, "flops": steps * fps}
        used += steps * fps
    return {"budget": budget, "spent": spent, "stages": stages, "flops": used, "left": budget - used}


# ------------------------------------------------------------------------------------------------
# the evaluator
# ------------------------------------------------------------------------------------------------

def _weights_digest(spec: str) -> str | None:
    path = Path(spec)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [Path(spec.partition(":")[2])]
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()


def check_evaluator(eval_spec: str, rerank_specs: list[str]) -> None:
    """The evaluator CLIP must be another model than the one used for reranking / conditioning (same path or
    same weights): a model scored by the CLIP it was reranked or conditioned with would grade its own homework."""
    from dalle_ar.config import ConfigError

    for spec in rerank_specs:
        same_path = Path(eval_spec).resolve() == Path(spec).resolve()
        digest = _weights_digest(eval_spec)
        if same_path or (digest is not None and digest == _weights_digest(spec)):
            raise ConfigError(f"--eval-clip {eval_spec} is the CLIP used for reranking/conditioning ({spec}); train a "
                              f"separate evaluator: train/train_clip.py --seed 1 --embed_dim 64 --out runs/eval_clip")
