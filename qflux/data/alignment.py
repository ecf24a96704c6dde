"""Is a target aligned with its control? Shift and scale by phase correlation on small grey images.

Phase correlation of images a and b (same size, Hann-windowed, mean removed):

    R = A · conj(B) / |A · conj(B)|          (A, B their 2-D Fourier transforms)
    r = |ifft2(R)|

If b is a moved by d (b(x) = a(x − d)), r is a delta at −d (mod the size): the peak's position
is the shift and its height (≤ 1) how much of the picture moved together. An edit that changes
part of the picture lowers the peak but keeps it where it is; an inverted picture gives a negative
delta, hence the absolute value. Sub-pixel: a parabola through the peak and its neighbours, per
axis. Scale (a re-framed export): the target is zoomed about its centre by each candidate factor
and the factor with the highest peak wins.
"""

from __future__ import annotations

import attrs
import numpy as np
from PIL import Image

SIDE = 256
"""Longest side of the grey images compared (pixels)."""
SCALES = tuple(round(1 + 0.02 * k, 2) for k in range(-5, 6))
"""Zoom factors tried, 0.90 to 1.10 in steps of 0.02."""
SCALE_TIE = 0.01
"""Peaks within this fraction of the highest are a tie, which the zoom nearest 1 wins: on a small image a
2% zoom moves no pixel by a whole pixel (64 px: 0.6 px at the edge), so its peak equals the unzoomed one
to a few thousandths and an edit elsewhere in the picture decides which is higher."""


@attrs.frozen
class Alignment:
    """How the target sits against its control, in the target's own pixels."""

    dx: float
    """Content moved right by this many pixels (negative: left)."""
    dy: float
    """Content moved down by this many pixels (negative: up)."""
    scale: float
    """Target content / control content size (1.0: same framing)."""
    peak: float
    """Height of the correlation peak in [0, 1]: how much of the picture the estimate speaks for."""

    def in_width(self, width: int, measured_width: int) -> Alignment:
        """The same alignment in the pixels of an image ``width`` wide (measured ``measured_width``)."""
        f = width / measured_width
        return attrs.evolve(self, dx=self.dx * f, dy=self.dy * f)

    @property
    def shift(self) -> float:
        """|(dx, dy)| in pixels."""
        return float(np.hypot(self.dx, self.dy))


def grey(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` as float32 grey [H, W] in [0, 1] at ``size`` (width, height)."""
    return np.asarray(image.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def small_size(width: int, height: int, side: int = SIDE) -> tuple[int, int]:
    """(width, height) with the longest side at most ``side``, aspect kept."""
    f = min(1.0, side / max(width, height))
    return max(8, round(width * f)), max(8, round(height * f))


def phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(dx, dy, peak) with b(x) ≈ a(x − d), for two [H, W] arrays of one size (see the module)."""
    h, w = a.shape
    window = np.outer(np.hanning(h), np.hanning(w)).astype(np.float32)
    fa = np.fft.rfft2((a - a.mean()) * window)
    fb = np.fft.rfft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    r = np.abs(np.fft.irfft2(cross / np.maximum(np.abs(cross), 1e-12), s=(h, w)))
    iy, ix = np.unravel_index(int(np.argmax(r)), r.shape)

    def refine(m: float, c: float, p: float) -> float:  # vertex of the parabola through (−1, m), (0, c), (1, p)
        d = m - 2 * c + p
        return 0.0 if d == 0 else 0.5 * (m - p) / d

    sy = iy + refine(r[(iy - 1) % h, ix], r[iy, ix], r[(iy + 1) % h, ix])
    sx = ix + refine(r[iy, (ix - 1) % w], r[iy, ix], r[iy, (ix + 1) % w])
    sy = sy - h if sy > h / 2 else sy  # wrap to (−H/2, H/2]
    sx = sx - w if sx > w / 2 else sx
    return float(sx), float(sy), float(r[iy, ix])


def zoom(a: np.ndarray, factor: float) -> np.ndarray:
    """``a`` [H, W] magnified by ``factor`` about its centre, same size (edges repeated)."""
    if factor == 1.0:
        return a
    h, w = a.shape
    ys = np.clip(((np.arange(h) - (h - 1) / 2) / factor + (h - 1) / 2).round().astype(int), 0, h - 1)
    xs = np.clip(((np.arange(w) - (w - 1) / 2) / factor + (w - 1) / 2).round().astype(int), 0, w - 1)
    return a[np.ix_(ys, xs)]


def align(control: Image.Image, target: Image.Image, *, scales: tuple[float, ...] = SCALES) -> Alignment:
    """How ``target`` is moved and scaled against ``control`` (both resized to the target's aspect
    at :data:`SIDE` pixels; the shift is given in the target's pixels)."""
    size = small_size(*target.size)
    a, b = grey(control, size), grey(target, size)
    # undo each candidate zoom of the target: a target whose content is s× larger, shrunk by 1/s
    found = {s: phase_correlation(a, zoom(b, 1 / s)) for s in scales}
    # the highest peak wins; a peak within SCALE_TIE of a higher one, at a scale nearer 1, wins the tie
    top = max(peak for _, _, peak in found.values())
    s = min((s for s, (_, _, peak) in found.items() if peak >= top * (1 - SCALE_TIE)), key=lambda s: abs(s - 1))
    dx, dy, peak = found[s]
    f = target.size[0] / size[0]
    return Alignment(dx=dx * f, dy=dy * f, scale=s, peak=peak)
