"""Writing pictures of a run: the loss curve and labelled image rows (PNG files)."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def smoothing_window(n: int) -> int:
    """Steps in the loss curve's moving average for ``n`` losses: the progress bar's 10, or 1/20
    of a long run; 0 (no average) for fewer than 2 losses."""
    return 0 if n < 2 else min(n, max(10, n // 20))


def save_loss_curve(losses: Sequence[float], path: str | Path, *, title: str = "training loss") -> Path:
    """Plot per-step losses and their moving average (:func:`smoothing_window`) to a PNG."""

    # deferred: matplotlib is a heavy import
    from matplotlib.figure import Figure

    y = np.asarray(losses, dtype=np.float64)
    x = np.arange(1, len(y) + 1)
    # a Figure of its own, not pyplot's: no global registry holds it
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(x, y, lw=0.8, alpha=0.5, label="loss")
    k = smoothing_window(len(y))
    if k:
        ax.plot(x[k - 1 :], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    fig.clear()
    del fig, ax
    # A figure is a web of reference cycles that only a full collection frees; left to the
    # collector's schedule, each checkpoint's plot stayed resident (benchmarks/soak.py: +0.9 MB per
    # checkpoint before this line, flat after it).
    gc.collect()
    return Path(path)


def save_image_row(
    images: Sequence[Image.Image], labels: Sequence[str], path: str | Path, *, min_height: int = 192
) -> Path:
    """Images side by side, each with a caption above; all scaled to one height of at least
    ``min_height`` pixels (nearest-neighbour, so tiny images stay crisp)."""
    h = max(min_height, *(im.height for im in images))
    scaled = [im.resize((max(1, round(im.width * h / im.height)), h), Image.Resampling.NEAREST) for im in images]
    pad = 14
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + 4 * (len(scaled) - 1), h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for im, label in zip(scaled, labels, strict=True):
        canvas.paste(im, (x, pad))
        draw.text((x + 1, 1), label, fill="black")
        x += im.width + 4
    canvas.save(path)
    return Path(path)


GRID_GAP = 4
GRID_LABEL = 14


def grid_cell(images: Sequence[Image.Image], min_size: int = 128) -> int:
    """Side of the square cell every panel of a grid is fitted into (pixels)."""
    return max(min_size, *(max(im.width, im.height) for im in images))


def save_image_grid(
    rows: Sequence[Sequence[Image.Image]],
    labels: Sequence[Sequence[str]],
    path: str | Path,
    *,
    min_size: int = 128,
) -> np.ndarray:
    """Rows of labelled panels, each scaled (nearest-neighbour, aspect kept) into one square cell.

    The canvas is ``cols·S + (cols − 1)·4`` wide and ``rows·(S + 14)`` high, S = :func:`grid_cell`,
    cols = the longest row. Returns the image as [H, W, 3] uint8 (for trackers) and writes it.
    """
    side = grid_cell([im for row in rows for im in row], min_size)
    cols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (cols * side + (cols - 1) * GRID_GAP, len(rows) * (side + GRID_LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, names) in enumerate(zip(rows, labels, strict=True)):
        y = r * (side + GRID_LABEL)
        for c, (im, label) in enumerate(zip(row, names, strict=True)):
            x = c * (side + GRID_GAP)
            scale = side / max(im.width, im.height)
            fitted = im.resize(
                (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST
            )
            canvas.paste(fitted, (x + (side - fitted.width) // 2, y + GRID_LABEL + (side - fitted.height) // 2))
            draw.text((x + 1, y + 1), label, fill="black")
    canvas.save(path)
    return np.asarray(canvas)
