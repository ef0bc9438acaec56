"""AR versus unCLIP across matched training budgets (train/compare_scaling.py): from the report.json that
train/train_matched.py writes at each budget, each backend's best setting, a table, plots against training FLOPs,
and a verdict in which every sentence is computed from those numbers (`verdict`).

A row is one backend at one budget: its best setting there (highest caption accuracy; ties: higher evaluator CLIP
score), the training FLOPs counted on its exports, and that setting's figures with their 95% bootstrap intervals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dalle_ar.comparison import by_objects_cells, fmt_ci
from dalle_ar.config import ConfigError
from dalle_ar.report import markdown_table

BACKENDS = {"ar": "AR", "unclip": "unCLIP"}
OBJECTS = ["1", "2"]  # the shapes world names one or two shapes per caption
FIGURES = ("caption_accuracy", "clip_score", "fd")  # copied with their "<name>_ci" intervals


def budget_name(flops: float) -> str:
    """2e13 -> "2e13", 1.5e13 -> "1.5e13" (a budget's directory name and label)."""
    mantissa, _, exponent = f"{flops:g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def parse_budgets(text: str) -> list[float]:
    """--budgets "2e13,4e13,8e13" -> [2e13, 4e13, 8e13], ascending; at least two distinct positive budgets."""
    try:
        budgets = sorted(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--budgets {text}: not a comma-separated list of FLOPs; pass e.g. --budgets 2e13,4e13,8e13") \
            from None
    names = [budget_name(b) for b in budgets]
    if len(set(names)) < 2 or len(set(names)) < len(names) or budgets[0] <= 0:
        raise ConfigError(f"--budgets {text}: needs at least two distinct budgets, all > 0, to show a trend; pass e.g. "
                          f"--budgets 2e13,4e13,8e13 (one budget is train/train_matched.py --train-budget-flops)")
    return [float(name) for name in names]  # a budget is what its name says (its run directory, its label)


# ------------------------------------------------------------------------------------------------
# rows: each backend's best setting at each budget
# ------------------------------------------------------------------------------------------------

def best_setting(settings: list[dict], backend: str) -> dict:
    """The backend's setting with the highest caption accuracy (ties: higher evaluator CLIP score)."""
    mine = [s for s in settings if s["backend"] == backend]
    if not mine or any(s.get("caption_accuracy") is None for s in mine):
        raise ConfigError(f"no caption accuracy for {BACKENDS[backend]}: the scaling verdict compares caption accuracy "
                          f"on shapes-world prompts; pass --synthetic-prompts N (N > 0)")
    return max(mine, key=lambda s: (s["caption_accuracy"], s["clip_score"]))


def budget_rows(budget: float, report: dict, path: str) -> list[dict]:
    """One row per backend from one budget's report.json (read from `path`)."""
    rows = []
    for backend in BACKENDS:
        s = best_setting(report["settings"], backend)
        rows.append({"budget": budget, "backend": backend, "setting": s["setting"],
                     "training_flops": report["cost"][backend]["training_flops"],
                     **{k: s.get(k) for f in FIGURES for k in (f, f"{f}_ci")},
                     "caption_accuracy_by_objects": s.get("caption_accuracy_by_objects") or {},
                     "seconds_per_image": s["seconds_per_image"], "batch_size": s["batch_size"], "report": path})
    return rows


def aggregate(reports: dict[float, Path]) -> dict:
    """scaling.json's content from {budget: its report.json}: rows, the real renders of the largest budget (the
    ceiling, and FD's floor), the device of each budget, and the verdict."""
    loaded = {budget: json.loads(Path(reports[budget]).read_text()) for budget in sorted(reports)}
    rows = [row for budget, report in loaded.items() for row in budget_rows(budget, report, str(reports[budget]))]
    devices = {budget_name(budget): report["device"] for budget, report in loaded.items()}
    return {"budgets": sorted(reports), "devices": devices, "rows": rows,
            "real": {"budget": max(reports), **loaded[max(reports)]["real"]}, "verdict": verdict(rows)}


# ------------------------------------------------------------------------------------------------
# the verdict
# ------------------------------------------------------------------------------------------------

def separated(a: list | None, b: list | None) -> bool | None:
    """Whether two 95% intervals do not overlap; None when either is missing (--bootstrap 0, or one prompt)."""
    if not a or not b:
        return None
    return a[0] > b[1] or b[0] > a[1]


def _acc(value: float, ci) -> str:
    return fmt_ci(value, ci, 2)


def _difference(higher: str, sep: bool | None) -> str:
    """How far apart two figures are: ahead / within noise / unknown noise."""
    if sep:
        return f"{higher} ahead (95% CIs separate)"
    if sep is False:
        return f"within noise (CIs overlap; {higher} higher)"
    return f"{higher} higher (no intervals to judge the noise: --bootstrap 0 or a single prompt)"


def _budget_sentence(budget: float, ar: dict, un: dict) -> tuple[str, str]:
    """(the sentence for one budget, its outcome: "AR" | "unCLIP" | "noise" | "tie")."""
    a, b = ar["caption_accuracy"], un["caption_accuracy"]
    figures = f"caption accuracy AR {_acc(a, ar['caption_accuracy_ci'])} vs unCLIP {_acc(b, un['caption_accuracy_ci'])}"
    if a == b:
        return f"At {budget_name(budget)} FLOPs: tied, {figures}.", "tie"
    higher = "AR" if a > b else "unCLIP"
    sep = separated(ar["caption_accuracy_ci"], un["caption_accuracy_ci"])
    return f"At {budget_name(budget)} FLOPs: {_difference(higher, sep)}, {figures}.", higher if sep else "noise"


def _trend_sentence(backend: str, rows: list[dict]) -> str:
    """A backend's caption accuracy from the first to the last budget."""
    name = BACKENDS[backend]
    path = " -> ".join(f"{r['caption_accuracy']:.2f} ({budget_name(r['budget'])})" for r in rows)
    if len(rows) < 2:
        return f"{name}: caption accuracy {path}; one budget, no trend."
    first, last = rows[0], rows[-1]
    change = last["caption_accuracy"] - first["caption_accuracy"]
    if change == 0:
        return f"{name}: caption accuracy {path}: unchanged from the first to the last budget."
    sep = separated(first["caption_accuracy_ci"], last["caption_accuracy_ci"])
    noise = {True: "beyond noise (the first and last budgets' CIs separate)",
             False: "within noise (the first and last budgets' CIs overlap)", None: "no intervals to judge the noise"}
    return (f"{name}: caption accuracy {path}: {'up' if change > 0 else 'down'} {abs(change):.2f} from the first to the "
            f"last budget, {noise[sep]}.")


def _objects_sentence(row: dict) -> str:
    """One- versus two-shape prompts for one backend at one budget."""
    name, split = BACKENDS[row["backend"]], row["caption_accuracy_by_objects"]
    missing = [n for n in ("1", "2") if n not in split]
    if missing:
        return f"{name} at {budget_name(row['budget'])}: no {' or '.join(missing)}-shape prompts, no gap to report."
    one, two = split["1"], split["2"]
    figures = (f"1-shape prompts {_acc(one['accuracy'], one['ci'])} (n={one['prompts']}) vs 2-shape "
               f"{_acc(two['accuracy'], two['ci'])} (n={two['prompts']})")
    gap = one["accuracy"] - two["accuracy"]
    if gap == 0:
        return f"{name} at {budget_name(row['budget'])}: {figures}: no gap."
    higher = "1-shape" if gap > 0 else "2-shape"
    sep = separated(one["ci"], two["ci"])
    noise = {True: "CIs separate", False: "within noise, CIs overlap", None: "no intervals to judge the noise"}
    return f"{name} at {budget_name(row['budget'])}: {figures}: {higher} higher by {abs(gap):.2f} ({noise[sep]})."


def _cost_sentence(pairs: list[tuple[float, dict, dict]]) -> str:
    """Seconds per kept image of the two best settings at each budget, as a ratio."""
    parts = []
    for budget, ar, un in pairs:
        a, b = ar["seconds_per_image"], un["seconds_per_image"]
        if min(a, b) <= 0:
            parts.append(f"{budget_name(budget)}: AR {a:.3g} s, unCLIP {b:.3g} s")
            continue
        slower, faster, ratio = ("unCLIP", "AR", b / a) if b >= a else ("AR", "unCLIP", a / b)
        parts.append(f"{budget_name(budget)}: AR {a:.3g} s, unCLIP {b:.3g} s ({slower} {ratio:.1f}x {faster}'s)")
    return "Seconds per kept image of the best settings (at their sweep batch): " + "; ".join(parts) + "."


def verdict(rows: list[dict]) -> str:
    """The verdict paragraph, computed from `rows` (`budget_rows`): at each budget which backend has the higher
    caption accuracy and whether the 95% intervals separate; each backend's trend from the first to the last budget;
    the one- versus two-shape gap per backend at the largest budget; seconds per kept image as a ratio."""
    by = {(r["budget"], r["backend"]): r for r in rows}
    budgets = sorted({r["budget"] for r in rows})
    pairs = [(b, by[b, "ar"], by[b, "unclip"]) for b in budgets]
    sentences, outcomes = [], []
    for budget, ar, un in pairs:
        sentence, outcome = _budget_sentence(budget, ar, un)
        sentences.append(sentence)
        outcomes.append(outcome)
    count = {k: outcomes.count(k) for k in ("AR", "unCLIP", "noise", "tie")}
    sentences.append(f"Over {len(budgets)} budgets: AR ahead at {count['AR']}, unCLIP ahead at {count['unCLIP']}, "
                     f"within noise or without intervals at {count['noise']}, tied at {count['tie']}.")
    sentences += [_trend_sentence(backend, [by[b, backend] for b in budgets]) for backend in BACKENDS]
    sentences += [_objects_sentence(by[budgets[-1], backend]) for backend in BACKENDS]
    sentences.append(_cost_sentence(pairs))
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------
# plots and report.md
# ------------------------------------------------------------------------------------------------

def _errorbar(ax, rows: list[dict], y, ci, label: str, fmt: str = "o-", color=None) -> None:
    """One line through (training FLOPs, y) with its intervals as error bars; y and ci are row -> value functions."""
    pts = sorted((r for r in rows if r["training_flops"] is not None and y(r) is not None),
                 key=lambda r: r["training_flops"])
    if not pts:
        return
    err = None
    if all(ci(r) for r in pts):
        err = [[max(0.0, y(r) - ci(r)[0]) for r in pts], [max(0.0, ci(r)[1] - y(r)) for r in pts]]
    ax.errorbar([r["training_flops"] for r in pts], [y(r) for r in pts], yerr=err, fmt=fmt, capsize=3, label=label,
                color=color)


def plot(rows: list[dict], real: dict, out: Path) -> list[Path]:
    """scaling.png (caption accuracy, evaluator CLIP score, FD, seconds per image vs training FLOPs) and
    scaling_by_objects.png (caption accuracy on 1- and 2-shape prompts vs training FLOPs), one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    panels = [("caption_accuracy", "caption accuracy (synthetic.check)", real.get("caption_accuracy"), "real renders"),
              ("clip_score", "evaluator CLIP score", real.get("clip_score"), "real renders"),
              ("fd", "FD to held-out renders (lower is better)", real.get("fd_floor"), "2nd real set"),
              ("seconds_per_image", "seconds per kept image (sweep batch)", None, "")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    for ax, (key, ylabel, reference, ref_label) in zip(axes.flat, panels):
        for i, backend in enumerate(BACKENDS):
            _errorbar(ax, [r for r in rows if r["backend"] == backend], lambda r: r.get(key),
                      lambda r: r.get(f"{key}_ci"), BACKENDS[backend], color=f"C{i}")
        if reference is not None:
            ax.axhline(reference, ls="--", color="gray", lw=1, label=ref_label)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (counted on the exports)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("AR vs unCLIP at matched training budgets: each backend's best setting per budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharex=True, sharey=True)
    for ax, n in zip(axes, ("1", "2")):
        if not any(n in r["caption_accuracy_by_objects"] for r in rows):
            ax.text(0.5, 0.5, f"no {n}-shape prompts", transform=ax.transAxes, ha="center")
        for i, backend in enumerate(BACKENDS):
            _errorbar(ax, [r for r in rows if r["backend"] == backend],
                      lambda r: (r["caption_accuracy_by_objects"].get(n) or {}).get("accuracy"),
                      lambda r: (r["caption_accuracy_by_objects"].get(n) or {}).get("ci"), BACKENDS[backend],
                      color=f"C{i}")
        ceiling = ((real.get("caption_accuracy_by_objects") or {}).get(n) or {}).get("accuracy")
        if ceiling is not None:
            ax.axhline(ceiling, ls="--", color="gray", lw=1, label="real renders")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (counted on the exports)")
        ax.set_ylabel(f"caption accuracy, {n}-shape prompts")
        ax.set_title(f"{n}-shape prompts", fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling_by_objects.png")
    plt.close(fig)
    return [out / "scaling.png", out / "scaling_by_objects.png"]


def copy_budget_report(src: Path, out: Path, budget: float) -> str:
    """A budget's report (report.md, report.json and its plots and side-by-side grid; not its runs or sample grids)
    copied into <out>/budget_<B>, so that the report directory stands on its own (e.g. committed under docs/).
    Returns the link to its report.md, relative to `out`."""
    dst = out / f"budget_{budget_name(budget)}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.suffix == ".png" or f.name in ("report.md", "report.json")):
            shutil.copyfile(f, dst / f.name)
    return f"{dst.name}/report.md"


def remove_other_budget_reports(out: Path, budgets) -> list[str]:
    """Delete the budget reports in `out` (budget_<B> directories with a report.json, as `copy_budget_report` writes
    them) of budgets other than `budgets`: left by an earlier report into the same directory, they would sit beside
    this report's without being in it. Returns their names."""
    keep = {f"budget_{budget_name(b)}" for b in budgets}
    stale = sorted(d for d in out.glob("budget_*") if d.is_dir() and d.name not in keep and (d / "report.json").exists())
    for d in stale:
        shutil.rmtree(d)
    return [d.name for d in stale]


def write_report(out: Path, scaling: dict) -> None:
    """report.md and scaling.json (plots beside them) in `out`, with a copy of each budget's report; the copies of
    other budgets' reports that an earlier report left in `out` are deleted."""
    rows, real = scaling["rows"], scaling["real"]
    for name in remove_other_budget_reports(out, scaling["budgets"]):
        print(f"{out / name}: removed, a budget this report does not have (from an earlier report into {out})")
    plot(rows, real, out)
    table = [{"budget": budget_name(r["budget"]), "backend": BACKENDS[r["backend"]], "setting": r["setting"],
              "flops": f"{r['training_flops']:.4g}" if r["training_flops"] is not None else "-",
              "acc": fmt_ci(r["caption_accuracy"], r["caption_accuracy_ci"], 3), **by_objects_cells(r, OBJECTS),
              "clip": fmt_ci(r["clip_score"], r["clip_score_ci"]),
              "fd": fmt_ci(r["fd"], r["fd_ci"], 4), "s": f"{r['seconds_per_image']:.4f} (batch {r['batch_size']})"}
             for r in rows]
    table.append({"budget": budget_name(real["budget"]), "backend": "real renders", "setting": "held-out renders",
                  "flops": "-", "acc": fmt_ci(real.get("caption_accuracy"), real.get("caption_accuracy_ci"), 3),
                  **by_objects_cells(real, OBJECTS),
                  "clip": fmt_ci(real.get("clip_score"), real.get("clip_score_ci")),
                  "fd": f"{real['fd_floor']:.4f} (2nd real set)", "s": "-"})
    columns = [("budget", "budget"), ("backend", "backend"), ("best setting", "setting"), ("training FLOPs", "flops"),
               ("caption accuracy [95% CI]", "acc"), *[(f"{n}-obj acc.", f"obj{n}") for n in OBJECTS],
               ("CLIP score", "clip"), ("FD", "fd"), ("s/img", "s")]
    devices = set(scaling["devices"].values())
    device = (next(iter(devices)) if len(devices) == 1 else
              "; ".join(f"{d} ({b})" for b, d in scaling["devices"].items()) + " (timings differ by device)")
    reports = "\n".join(f"- {budget_name(r['budget'])}: [{path}]({path})" for r in rows if r["backend"] == "ar"
                        for path in [copy_budget_report(Path(r["report"]).parent, out, r["budget"])])
    md = f"""# AR versus unCLIP at matched training budgets

Command: `{scaling['command']}`

Device: {device}. Budgets: {', '.join(budget_name(b) for b in scaling['budgets'])} training FLOPs per backend
(train/train_matched.py at each; each backend ends below its budget by less than one step of its last stage).

## Best setting per budget and backend

{markdown_table(table, columns)}

Best setting: the backend's highest caption accuracy at that budget (ties: higher evaluator CLIP score), chosen on
the same prompts it is scored on. Caption accuracy: fraction of kept images whose pixels match the caption
(`synthetic.check`); n-obj: on the prompts that name n shapes. 95% bootstrap intervals over prompts (FD: over
images). Training FLOPs: counted on the exports (FlopCounterMode x steps; AR includes its dVAE). The real-renders
row is the largest budget's ceiling (FD: a second real set, the floor at this sample size).

## Plots

![caption accuracy, CLIP score, FD and seconds per image vs training FLOPs](scaling.png)
![caption accuracy on 1- and 2-shape prompts vs training FLOPs](scaling_by_objects.png)

## Verdict

{scaling['verdict']}

(Every sentence above is computed from the table by `dalle_ar.scaling.verdict`; non-overlapping 95% intervals
count as separated.)

## Per-budget reports

{reports}
"""
    (out / "report.md").write_text(md)
    (out / "scaling.json").write_text(json.dumps(scaling, indent=2))
