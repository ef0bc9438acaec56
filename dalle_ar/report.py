"""Things people look at: image grids (the one grid writer), scatter plots and markdown tables."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid


def device_name(device: str | torch.device) -> str:
    """How results name the hardware they were measured on."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> PIL RGB."""
    arr = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, row_labels: Sequence[str] | None = None,
              scale: int = 2, label_width: int = 300, tile_labels: Sequence[str] | None = None) -> Path:
    """Save (N, 3, H, W) images in [0, 1] as a grid with `nrow` images per row, optionally with a
    text label left of each row (the prompt) and a line under each image (`tile_labels`, e.g. its rank
    and score), upscaled `scale`x with nearest neighbour for small images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = to_pil(make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    if tile_labels:
        grid = _label_tiles(grid, tuple(images.shape[-2:]), min(nrow, len(images)), list(tile_labels), scale)
    if row_labels:
        canvas = Image.new("RGB", (grid.width + label_width, grid.height), "white")
        canvas.paste(grid, (label_width, 0))
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        row_h = grid.height / len(row_labels)
        for i, label in enumerate(row_labels):
            lines = _wrap(label, max_chars=label_width // 7)
            y = i * row_h + row_h / 2 - 6 * len(lines)
            for j, line in enumerate(lines):
                draw.text((6, y + 12 * j), line, fill="black", font=font)
        grid = canvas
    grid.save(path)
    return path


def _wrap(text: str, max_chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > max_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def _label_tiles(grid: Image.Image, hw: tuple[int, int], ncol: int, labels: list[str], scale: int,
                 line: int = 12) -> Image.Image:
    """Open a band under each row of make_grid's layout (padding 2) and write each tile's label there, wrapped to the
    tile's width (a word longer than that is cut): `line` pixels per line of the longest label."""
    (h, w), pad = hw, 2
    band = (h + pad) * scale
    width = max(1, w * scale // 6)  # characters of the default font that fit under a tile
    wrapped = [[word[:width] for word in _wrap(label, width)] for label in labels]
    strip = line * max(1, max(map(len, wrapped), default=1))
    rows = -(-len(labels) // ncol)
    canvas = Image.new("RGB", (grid.width, grid.height + rows * strip), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r in range(rows):
        canvas.paste(grid.crop((0, r * band, grid.width, (r + 1) * band + pad * scale)), (0, r * (band + strip)))
    for i, lines in enumerate(wrapped):
        r, c = divmod(i, ncol)
        x, y = c * (w + pad) * scale + pad * scale, r * (band + strip) + band + pad * scale - 1
        for j, text in enumerate(lines):
            draw.text((x, y + line * j), text, fill="black", font=font)
    return canvas


# ------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg: files only, no display)
# ------------------------------------------------------------------------------------------------

def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both axes, for lower x (cost) and higher y (quality);
    sorted by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    front, best = [], float("-inf")
    for i in order:
        if ys[i] > best:
            front.append(i)
            best = ys[i]
    return front


def scatter_plot(points: Sequence[dict], x: str, y: str, path: str | Path, *, group: str = "backend",
                 label: str = "setting", xlabel: str | None = None, ylabel: str | None = None, title: str = "",
                 logx: bool = False, pareto: bool = False, yerr: str | None = None) -> Path:
    """One marker per point dict (points[i][x], points[i][y]), a colour per `group` value, each point
    annotated with its `label`; `yerr` names a (low, high) interval key drawn as error bars; with `pareto`,
    the cost/quality front over all points (lower x, higher y) is drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = [p for p in points if p.get(x) is not None and p.get(y) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for gi, g in enumerate(dict.fromkeys(p[group] for p in pts)):
        sel = [p for p in pts if p[group] == g]
        xs, ys = [p[x] for p in sel], [p[y] for p in sel]
        err = None
        if yerr:
            err = [[max(0.0, p[y] - p[yerr][0]) for p in sel], [max(0.0, p[yerr][1] - p[y]) for p in sel]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, color=f"C{gi}", label=str(g))
        for p in sel:
            ax.annotate(str(p[label]), (p[x], p[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if pareto and pts:
        front = pareto_front([p[x] for p in pts], [p[y] for p in pts])
        ax.plot([pts[i][x] for i in front], [pts[i][y] for i in front], "k--", lw=1, label="Pareto front")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table: `columns` are (header, key) pairs; values are printed as given (format them first)."""
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(k, "")) for _, k in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])
