"""Things people look at: image grids (the one grid writer) and, later, tables and plots."""

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
                 strip: int = 12) -> Image.Image:
    """Open a `strip`-pixel band under each row of make_grid's layout (padding 2) and write each tile's label."""
    (h, w), pad = hw, 2
    band = (h + pad) * scale
    rows = -(-len(labels) // ncol)
    canvas = Image.new("RGB", (grid.width, grid.height + rows * strip), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for r in range(rows):
        canvas.paste(grid.crop((0, r * band, grid.width, (r + 1) * band + pad * scale)), (0, r * (band + strip)))
    for i, label in enumerate(labels):
        r, c = divmod(i, ncol)
        x, y = c * (w + pad) * scale + pad * scale, r * (band + strip) + band + pad * scale - 1
        draw.text((x, y), label[: max(1, w * scale // 6)], fill="black", font=font)
    return canvas
