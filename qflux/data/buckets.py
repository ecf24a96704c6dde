"""Aspect-ratio buckets: a few training resolutions that every pair is cropped and resized into, so
that pairs of different sizes still make full batches.

The buckets of an area A (``data.max_pixels``, or the largest target's area when that is smaller, so a
folder of small images is not upscaled) and a side multiple m (the model's VAE factor × 2) are one
resolution per aspect ratio

    r_k = 2^(k/4),  k = −8 … 8          (1:4 … 4:1 in 17 steps of ×1.19)
    (w_k, h_k) = (⌊√(A·r_k)⌋_m, ⌊√(A/r_k)⌋_m)      (sides floored to multiples of m, area ≤ A)

A target goes to the bucket nearest its aspect (in log ratio), is scaled to cover it and centre-cropped;
the crop is the part of the scaled image outside the bucket,

    crop = 1 − min(r_s / r_b, r_b / r_s)      (r_s, r_b: the source's and the bucket's w/h)

at most 1 − 2^(−1/8) ≈ 8.3% of its area between neighbouring buckets (more where flooring to the
multiple moves a small bucket off its nominal aspect). A target whose nearest bucket would crop more than
:data:`MAX_CROP` (a panorama beyond 4:1, or a coarse small-area table) gets a bucket of its own aspect
(:func:`own_bucket`), with a warning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Size = tuple[int, int]
"""(width, height) in pixels."""
Box = tuple[float, float, float, float]
"""(left, top, right, bottom) of a crop, in the source image's pixels."""

RATIO_STEPS = 4
"""Buckets per doubling of the aspect ratio."""
MAX_ASPECT = 4.0
"""The widest bucket (and, inverted, the tallest)."""
MAX_CROP = 0.10
"""The largest fraction of a scaled image's area a bucket may crop away."""


def floor_to(x: float, multiple: int) -> int:
    """x floored to a multiple of ``multiple``, at least ``multiple``."""
    return max(multiple, int(x) // multiple * multiple)


def bucket_sizes(area: int, multiple: int) -> list[Size]:
    """The buckets of ``area`` (see the module docstring), narrowest aspect first, without duplicates."""
    steps = round(RATIO_STEPS * math.log2(MAX_ASPECT))
    out: list[Size] = []
    for k in range(-steps, steps + 1):
        size = _sized(2 ** (k / RATIO_STEPS), area, multiple)
        if size not in out:
            out.append(size)
    return out


def _sized(ratio: float, area: int, multiple: int) -> Size:
    """The largest (w, h) of aspect ``ratio`` with sides multiples of ``multiple`` and w·h ≤ area."""
    return floor_to(math.sqrt(area * ratio), multiple), floor_to(math.sqrt(area / ratio), multiple)


def crop_fraction(source: Size, target: Size) -> float:
    """The fraction of ``source`` (scaled to cover ``target``) that a centre crop to ``target`` removes."""
    r_s, r_t = source[0] / source[1], target[0] / target[1]
    return 1 - min(r_s / r_t, r_t / r_s)


def cover_box(source: Size, target: Size) -> Box:
    """The centred region of ``source`` with ``target``'s aspect: what is kept when ``source`` is
    scaled to cover ``target`` and centre-cropped (scaling the region to ``target`` does both)."""
    (sw, sh), (tw, th) = source, target
    scale = max(tw / sw, th / sh)
    cw, ch = min(sw, tw / scale), min(sh, th / scale)  # min: the side that fits is the whole side
    left, top = (sw - cw) / 2, (sh - ch) / 2
    return left, top, min(sw, left + cw), min(sh, top + ch)


def nearest_bucket(source: Size, buckets: Sequence[Size], area: int, multiple: int) -> tuple[Size, bool]:
    """The bucket nearest ``source``'s aspect (in log ratio, i.e. the one cropping least), or, when
    even it would crop more than :data:`MAX_CROP`, :func:`own_bucket`. Returns (bucket, whether it
    is the source's own)."""
    best = min(buckets, key=lambda b: crop_fraction(source, b))
    if crop_fraction(source, best) <= MAX_CROP:
        return best, False
    return own_bucket(source, area, multiple), True


def own_bucket(source: Size, area: int, multiple: int) -> Size:
    """A bucket of ``source``'s own aspect: the largest (w, h), sides multiples of ``multiple`` and
    w·h ≤ ``area``, that crops at most :data:`MAX_CROP`; when none does (an aspect the multiple
    cannot approach at this area), the one that crops least."""
    ratio = source[0] / source[1]
    candidates = []
    for h in range(multiple, int(math.sqrt(area / ratio)) + 2 * multiple, multiple):
        for w in {floor_to(ratio * h, multiple), floor_to(ratio * h, multiple) + multiple}:
            if w * h <= area:
                candidates.append((w, h))
    if not candidates:
        return multiple, multiple

    def rank(size: Size) -> tuple[bool, float]:
        crop = crop_fraction(source, size)
        return crop <= MAX_CROP, size[0] * size[1] if crop <= MAX_CROP else -crop

    return max(candidates, key=rank)


def bucket_area(max_pixels: int | None, target_sizes: Sequence[Size]) -> int:
    """The buckets' area: ``max_pixels``, or the largest target's area when that is smaller (or when
    there is no cap), so that images are scaled down to the buckets and small ones are not blown up."""
    largest = max(w * h for w, h in target_sizes)
    return largest if max_pixels is None else min(max_pixels, largest)
