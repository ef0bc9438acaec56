"""The AR-versus-diffusion report of sample/compare.py (and train/train_matched.py, which runs it): held-out real
renders, network evaluations per kept image, metrics of kept images under the evaluator CLIP (CLIP score, FD,
KID, diversity, caption accuracy, with bootstrap intervals), and report.md / report.json with their tables and
plots. The metrics themselves are dalle_ar.metrics'; generating the images is the pipelines' job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dalle_ar import metrics
from dalle_ar.clip import ClipScorer, clip_score
from dalle_ar.data import synthetic
from dalle_ar.report import markdown_table, scatter_plot

PRIOR_CANDIDATES = 2  # UnclipPipeline.generate's default: best of 2 prior samples per image (paper section 2.1)


# ------------------------------------------------------------------------------------------------
# real images and network evaluations
# ------------------------------------------------------------------------------------------------

def to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def real_set(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    examples = [synthetic.make_example(i, seed=seed) for i in range(n)]
    return torch.stack([to_tensor(im) for im, _ in examples]), [c for _, c in examples]


def _guidance_rows(scale: float) -> int:
    """Batch rows per sample and step: classifier-free guidance adds the unconditional row, except at scale 1."""
    return 1 if scale == 1 else 2


def nfe(setting: dict, image_seq_len: int, has_upsampler: bool, prior_guidance: float = 1.0) -> dict:
    """Network evaluations per kept image: `nfe_calls` sequential forwards, `nfe_rows` batch rows (see
    sample/compare.py's docstring)."""
    if setting["backend"] == "ar":
        calls = setting["rerank"] * image_seq_len
        return {"nfe_calls": calls, "nfe_rows": calls * _guidance_rows(setting["cond_scale"]),
                "nfe_note": f"{setting['rerank']} candidates x {image_seq_len} decode steps (+ {setting['rerank']} dVAE decodes)"}
    s = setting["steps"]
    calls = s + s + (s if has_upsampler else 0)
    rows = (s * PRIOR_CANDIDATES * _guidance_rows(prior_guidance) + s * _guidance_rows(setting["guidance"])
            + (s if has_upsampler else 0))
    return {"nfe_calls": calls, "nfe_rows": rows,
            "nfe_note": f"prior {s} + decoder {s}" + (f" + upsampler {s}" if has_upsampler else "") + " steps"}


# ------------------------------------------------------------------------------------------------
# metrics of kept images
# ------------------------------------------------------------------------------------------------

def interval(values, stat, bootstrap: int, seed: int):
    """Percentile 95% bootstrap interval of `stat` over `values` (`bootstrap` resamples, 0 = none), rounded."""
    if not bootstrap or len(values) < 2:
        return None
    lo, hi = metrics.bootstrap_ci(values, stat, n=bootstrap, generator=seed)
    return [round(lo, 4), round(hi, 4)]


def score(images: torch.Tensor, prompts: list[str], evaluator: ClipScorer, text_feats: torch.Tensor,
          real_feats: np.ndarray, checkable: list[bool], bootstrap: int) -> dict:
    """Metrics of (P, K, 3, H, W) images for their prompts under the evaluator CLIP."""
    p, k = images.shape[:2]
    feats = evaluator.encode_images(images.flatten(0, 1)).cpu()  # (P*K, D), unit norm
    cos = (feats.view(p, k, -1) * text_feats[:, None]).sum(-1)
    cs = clip_score(cos).numpy()  # (P, K)
    f = feats.double().numpy()
    n_boot = max(1, bootstrap // 5)  # set-level statistics cost more per resample
    kid_size = min(len(f), len(real_feats), 1000)
    out = {"clip_score": round(float(cs.mean()), 3), "clip_score_ci": interval(cs.mean(1), np.mean, bootstrap, 1),
           "fd": round(metrics.frechet_distance(f, real_feats), 5),
           "fd_ci": None if not bootstrap else [round(v, 5) for v in metrics.bootstrap_ci(
               f, lambda x: metrics.frechet_distance(x, real_feats), n=n_boot, generator=2)]}
    kid_mean, kid_std = metrics.kid(f, real_feats, subsets=50, subset_size=kid_size, generator=3)
    out.update(kid=round(kid_mean, 6), kid_std=round(kid_std, 6))
    if k >= 2:
        per_prompt = np.array([metrics.pairwise_distance_mean(x) for x in f.reshape(p, k, -1)])
        out.update(diversity=round(float(per_prompt.mean()), 5), diversity_ci=interval(per_prompt, np.mean, bootstrap, 4))
    rows = [i for i, c in enumerate(checkable) if c]
    if rows:
        passed = np.array([synthetic.check_batch(images[i], [prompts[i]] * k) for i in rows], dtype=float)  # (P', K)
        out.update(caption_accuracy=round(float(passed.mean()), 4),
                   caption_accuracy_ci=interval(passed.mean(1), np.mean, bootstrap, 5),
                   caption_accuracy_by_objects=accuracy_by_objects(passed, [prompts[i] for i in rows], bootstrap, 10))
    return out


def accuracy_by_objects(passed: np.ndarray, prompts: list[str], bootstrap: int, seed: int) -> dict:
    """Caption accuracy per number of shapes the prompt names: {"1": {"accuracy", "ci", "prompts"}, "2": ...};
    `passed` holds the pixel checks of the shapes-world `prompts`, (P,) or (P, K); intervals over prompts."""
    per_prompt = passed.reshape(len(prompts), -1).mean(1)
    objects = np.array([len(synthetic.parse_caption(p).shapes) for p in prompts])
    return {str(n): {"accuracy": round(float(per_prompt[objects == n].mean()), 4),
                     "ci": interval(per_prompt[objects == n], np.mean, bootstrap, seed + n),
                     "prompts": int((objects == n).sum())} for n in sorted(set(objects.tolist()))}


# ------------------------------------------------------------------------------------------------
# report.md, report.json
# ------------------------------------------------------------------------------------------------

def budget_summary(plan: dict, cost: dict) -> dict:
    """The plan next to what the report counts on the exports: per backend, planned and counted FLOPs."""
    out = {k: v for k, v in plan.items() if k not in ("ar", "unclip")}
    for backend in ("ar", "unclip"):
        counted = cost[backend]["training_flops"]
        out[backend] = {**plan[backend], "counted_flops": counted,
                        "counted_minus_budget": None if counted is None else counted - plan["budget_flops"]}
    return out


def fmt_ci(value, ci, digits=2) -> str:
    if value is None:
        return "-"
    s = f"{value:.{digits}f}"
    return s + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def sci(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def batch(training: dict) -> str:
    """A run's micro-batch for the cost table, with its data-parallel ranks when there are several."""
    b, ranks = training.get("batch_size"), training.get("world_size") or 1
    return "-" if not b else f"{b} x {ranks} ranks" if ranks > 1 else str(b)


def budget_section(report: dict) -> str:
    """Markdown: the --train-budget-flops plan per backend and stage next to the FLOPs counted on the exports."""
    b = report.get("train_budget")
    if not b:
        return ("## Training budget\n\nNot matched: the two backends were trained by their own trainers with the step "
                "counts above, so their training FLOPs differ and the plots show it. `train/train_matched.py "
                "--train-budget-flops F` trains both to the same budget.")
    cost, rows, lines = report["cost"], [], []
    for backend in ("ar", "unclip"):
        plan, counted = b[backend], cost[backend]["training"]
        for stage in [*plan["spent"], *plan["stages"]]:
            p, c = plan["stages"].get(stage), counted[stage]
            rows.append({"backend": backend, "stage": stage,
                         "planned": f"{p['steps']:,}" if p else "trained before", "counted": f"{c['steps']:,}",
                         "planned_flops": f"{p['flops']:.4g}" if p else f"{plan['spent'][stage]:.4g}",
                         "fps": f"{c['flops_per_step']:.4g}", "flops": f"{c['flops']:.4g}",
                         "how": ("skipped (finished before)" if not p["trained_now"] else "trained now") if p else
                                "given (--dvae)"})
        last = list(plan["stages"])[-1]
        total = cost[backend]["training_flops"]
        rows.append({"backend": f"**{backend} total**", "stage": "", "planned": "", "counted": "", "fps": "",
                     "planned_flops": f"**{plan['flops']:.4g}**", "flops": f"**{total:.4g}**", "how": ""})
        lines.append(f"- {'AR' if backend == 'ar' else 'unCLIP'}: budget {b['budget_flops']:.4g}, counted {total:.4g}, "
                     f"budget - counted = {b['budget_flops'] - total:.3g} (one {last} step: "
                     f"{plan['stages'][last]['flops_per_step']:.3g})")
    table = markdown_table(rows, [("backend", "backend"), ("stage", "stage"), ("planned steps", "planned"),
                                  ("planned FLOPs", "planned_flops"), ("counted steps", "counted"),
                                  ("counted FLOPs / step", "fps"), ("counted FLOPs", "flops"), ("run", "how")])
    return f"""## Matched training budget

`--train-budget-flops {b['budget_flops']:.4g}`: each backend was trained here, on the same data
(`{b['images']}`; AR reads its tokens `{b['tokens']}`), for the steps that bring its training FLOPs to the budget.
AR: the dVAE's run counts first, the transformer gets the rest; unCLIP: the prior gets
{b['prior_share']:g} of the budget, the decoder the rest (the shared CLIP is in neither). Steps are whole, so each
backend ends below its budget by less than one step of its last stage. Planned: FlopCounterMode over one step of
each model as its trainer builds it, before training; counted: the same on the exports afterwards, as in the table
above. Runs in `{b.get('runs') or Path(b['embeddings']).parent}`, CLIP embeddings in `{b['embeddings']}`.

{table}

{chr(10).join(lines)}"""


def by_objects_cells(row: dict, objects: list[str]) -> dict:
    """Table cells obj<n>: caption accuracy [95% CI] on the prompts that name n shapes."""
    split = row.get("caption_accuracy_by_objects") or {}
    return {f"obj{n}": fmt_ci(split[n]["accuracy"], split[n]["ci"], 3) if n in split else "-" for n in objects}


def write_report(out: Path, report: dict) -> None:
    rows = report["settings"]
    cost = report["cost"]
    for r in rows:
        r["flops"] = cost[r["backend"]]["training_flops"]
    plots = {
        "quality_vs_training_flops.png": dict(x="flops", y="clip_score", yerr="clip_score_ci", logx=True,
                                              xlabel="training FLOPs (FlopCounterMode x steps, all stages)",
                                              ylabel="evaluator CLIP score", title="quality vs training compute"),
        "quality_vs_seconds.png": dict(x="seconds_per_image", y="clip_score", yerr="clip_score_ci", logx=True,
                                       pareto=True, xlabel=f"seconds per kept image at batch {report['batch_size']} "
                                                          f"({report['device']})",
                                       ylabel="evaluator CLIP score", title="quality vs sampling time (Pareto front)"),
        "clip_score_vs_diversity.png": dict(x="diversity", y="clip_score", xlabel="diversity (mean pairwise cosine "
                                            "distance within a prompt)", ylabel="evaluator CLIP score",
                                            title="fidelity vs diversity"),
    }
    for name, kw in plots.items():
        scatter_plot(rows, path=out / name, **kw)
    if any(r.get("caption_accuracy") is not None for r in rows):
        scatter_plot(rows, x="seconds_per_image", y="caption_accuracy", yerr="caption_accuracy_ci", logx=True, pareto=True,
                     path=out / "accuracy_vs_seconds.png", xlabel="seconds per kept image",
                     ylabel="caption accuracy (synthetic.check)", title="caption accuracy vs sampling time")

    real = report["real"]
    objects = sorted({n for r in [*rows, real] for n in r.get("caption_accuracy_by_objects") or {}}, key=int)
    table = [{
        "setting": r["setting"], "clip": fmt_ci(r["clip_score"], r["clip_score_ci"]),
        "acc": fmt_ci(r.get("caption_accuracy"), r.get("caption_accuracy_ci"), 3), **by_objects_cells(r, objects),
        "fd": fmt_ci(r["fd"], r["fd_ci"], 4), "kid": f"{r['kid']:.4f} ± {r['kid_std']:.4f}",
        "div": fmt_ci(r.get("diversity"), r.get("diversity_ci"), 3),
        "s1": f"{r['seconds_per_image_batch1']:.4f}", "sb": f"{r['seconds_per_image']:.4f}",
        "nfe": f"{r['nfe_calls']} / {r['nfe_rows']}"} for r in rows]
    table.append({"setting": "real (held-out renders)", "clip": fmt_ci(real["clip_score"], real["clip_score_ci"]),
                  "acc": fmt_ci(real.get("caption_accuracy"), real.get("caption_accuracy_ci"), 3),
                  **by_objects_cells(real, objects), "fd": f"{real['fd_floor']:.4f} (2nd real set)",
                  "kid": f"{real['kid_floor']:.4f}", "div": "-", "s1": "-", "sb": "-", "nfe": "-"})
    quality = markdown_table(table, [
        ("setting", "setting"), ("CLIP score [95% CI]", "clip"), ("caption accuracy", "acc"),
        *[(f"{n}-obj acc.", f"obj{n}") for n in objects], ("FD", "fd"), ("KID", "kid"), ("diversity", "div"),
        ("s/img batch 1", "s1"), (f"s/img batch {report['batch_size']}", "sb"), ("NFE calls / rows", "nfe")])

    cost_rows = []
    for backend in ("ar", "unclip"):
        c = cost[backend]
        for stage, n in c["params"].items():
            if stage == "total":
                continue
            t = c["training"][stage]
            cost_rows.append({"backend": backend, "stage": stage, "params": f"{n:,}", "steps": t["steps"] or "-",
                              "batch": batch(t), "fps": sci(t["flops_per_step"]), "flops": sci(t["flops"])})
        cost_rows.append({"backend": f"**{backend} total**", "stage": "", "params": f"**{c['params']['total']:,}**",
                          "steps": "", "batch": "", "fps": "", "flops": f"**{sci(c['training_flops'])}**"})
    clip_t = cost["clip"]["training"] or {}
    cost_rows.append({"backend": "shared CLIP", "stage": "rerank / condition", "params": f"{cost['clip']['params']:,}",
                      "steps": clip_t.get("steps") or "-", "batch": batch(clip_t),
                      "fps": sci(clip_t.get("flops_per_step")), "flops": sci(clip_t.get("flops"))})
    cost_table = markdown_table(cost_rows, [("backend", "backend"), ("stage", "stage"), ("parameters", "params"),
                                            ("steps", "steps"), ("batch", "batch"), ("FLOPs / step", "fps"),
                                            ("training FLOPs", "flops")])
    best = report["best"]
    md = f"""# AR versus diffusion: {report['title']}

Command: `{report['command']}`

Device: {report['device']}, precision {report['precision']}. {report['num_prompts']} prompts x {report['samples_per_prompt']}
kept images per setting, sampling seed {report['seed']} for every setting. Evaluator CLIP: `{report['eval_clip']}`
(rerank / conditioning CLIP: `{report['clip']}`). FD / KID against {report['num_real']} held-out real renders.
{report['timing_note']}

## Quality and sampling cost per setting

{quality}

CLIP score: 100 x max(cos, 0) under the evaluator CLIP, 95% bootstrap interval over prompts. Caption accuracy:
fraction of kept images whose pixels match the caption (`synthetic.check`); n-obj: the same on the prompts that
name n shapes. FD / KID: evaluator-CLIP image features vs held-out real renders (lower is better; FD interval over
generated images). Diversity: mean pairwise cosine distance of a prompt's kept images. NFE calls = sequential
network forwards per kept image, rows = batch rows (AR rerank N costs N candidates per kept image).

## Training cost

{cost_table}

Training FLOPs: torch `FlopCounterMode` over one real training step (forward + backward at the run's
micro-batch; optimizer and elementwise work not counted) x gradient accumulation x data-parallel ranks x the steps
the run logged. Batch: the micro-batch, x ranks for a data-parallel run.

{budget_section(report)}

## Plots

![quality vs training FLOPs](quality_vs_training_flops.png)
![quality vs seconds per image](quality_vs_seconds.png)
![CLIP score vs diversity](clip_score_vs_diversity.png)
{"![caption accuracy vs seconds per image](accuracy_vs_seconds.png)" if (out / "accuracy_vs_seconds.png").exists() else ""}

## Side by side

Each prompt: the AR row ({best['ar']}) then the unCLIP row ({best['unclip']}), each backend's best setting by
evaluator CLIP score, same prompts and seed.

![side by side](side_by_side.png)
"""
    (out / "report.md").write_text(md)
    (out / "report.json").write_text(json.dumps(report, indent=2))
