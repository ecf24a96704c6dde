"""A small synthetic paired editing task, written in the dataset folder layout.

Each control image is a few random coloured rectangles and ellipses on a plain background; the
target is the same picture with its colours inverted, and the instruction says so. Sizes alternate
between a square and a landscape shape, so bucketing is exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

SIZES = ((64, 64), (80, 48))
PROMPT = "invert the colors of the image"


def draw_scene(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random scene of 3–5 filled shapes on a random background, size (w, h)."""
    w, h = size
    bg = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 6))):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = int(rng.integers(x0 + 6, w + 1)), int(rng.integers(y0 + 6, h + 1))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=color)
    return img


def make_synthetic_pairs(root: str | Path, n: int, seed: int, sizes: tuple[tuple[int, int], ...] = SIZES) -> Path:
    """Write ``n`` (control, inverted target, instruction) samples under ``root``.

    The files are a deterministic function of (n, seed, sizes); sample i has size sizes[i % len].
    """
    root = Path(root)
    (root / "control_images").mkdir(parents=True, exist_ok=True)
    (root / "training_images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = f"sample_{i:03d}"
        control = draw_scene(rng, sizes[i % len(sizes)])
        control.save(root / "control_images" / f"{name}.png")
        ImageOps.invert(control).save(root / "training_images" / f"{name}.png")
        (root / "training_images" / f"{name}.txt").write_text(PROMPT + "\n", encoding="utf-8")
    return root
