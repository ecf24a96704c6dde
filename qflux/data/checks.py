"""Warnings about pairs that pass the dataset's checks but will likely train badly: a target moved or
re-framed against its control (:mod:`qflux.data.alignment`), a target identical to its control, a control
whose aspect the target's crop cannot follow, a control that trains at a very different area from its target,
a too-short instruction, and (a note) one instruction
for every pair. The ``check`` command prints them; ``train`` prints them at its start."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from qflux.data.alignment import SIDE, align
from qflux.data.buckets import MAX_CROP, crop_fraction
from qflux.data.controls import area_ratio
from qflux.data.images import image_size, load_rgb
from qflux.data.pairs import PairSample

SHIFT_PX = 3.0
"""A target whose content moved this many of its pixels or more is reported."""
PEAK_MIN = 0.08
"""Correlation peak below which an estimate says nothing (measured on noisy scenes: a mirror 0.037
and an unrelated picture 0.033; moved pictures 0.36 to 0.99, inverted 0.96, re-framed ×1.06 0.60)."""
SCALE_MIN = 0.02
"""A re-framing by this fraction or more is reported."""
SHORT_PROMPT = 3
"""Instructions shorter than this (characters) are reported."""
CONTROL_SCALE = 2.0
"""A control that trains at this many times its target's area (or at this fraction of it) is reported."""


def pair_warnings(name: str, control: Image.Image, target: Image.Image, prompt: str,
                  target_width: int | None = None) -> list[str]:  # fmt: skip
    """The warnings for one pair (the first control image and the target, decoded), one line each.

    Args:
        target_width: the target file's width when ``target`` was decoded smaller (shifts are
            reported in the file's pixels).
    """
    out = []
    if len(prompt.strip()) < SHORT_PROMPT:
        out.append(f"{name}: the instruction {prompt.strip()!r} is under {SHORT_PROMPT} characters")
    if control.size == target.size and _identical(control, target):
        return [*out, f"{name}: the target is identical to its control (nothing to learn from this pair)"]
    crop = crop_fraction(control.size, target.size)
    if crop > MAX_CROP:
        (cw, ch), (tw, th) = control.size, target.size
        aspects = f"the control's aspect ({cw / ch:.2f}) and the target's ({tw / th:.2f})"
        return [*out, f"{name}: {aspects} differ by {crop:.0%}, more than the {MAX_CROP:.0%} a crop follows: "
                      "export them at one framing"]  # fmt: skip
    a = align(control, target)
    if a.peak < PEAK_MIN:
        return out
    a = a.in_width(target_width or target.size[0], target.size[0])
    if abs(a.scale - 1) >= SCALE_MIN - 1e-9:
        out.append(f"{name}: the target is scaled ×{a.scale:.2f} against its control (shift {round(a.dx):+d}, "
                   f"{round(a.dy):+d} px): re-export the target at the control's framing")  # fmt: skip
    elif a.shift >= SHIFT_PX:
        out.append(f"{name}: the target is shifted by {round(a.dx):+d}, {round(a.dy):+d} px against its control: "
                   "re-export it aligned, or the LoRA learns to move the picture")  # fmt: skip
    return out


def size_warnings(sample: PairSample) -> list[str]:
    """A warning per control image that trains at a very different area from its target (``data.control_size``
    and ``data.control_max_pixels`` decide): the LoRA then learns the edit across a change of scale."""
    out = []
    for k, size in enumerate(sample.control_sizes):
        if (ratio := area_ratio(size, sample.target_size)) >= CONTROL_SCALE:
            (cw, ch), (tw, th) = size, sample.target_size
            which = "its control" if k == 0 else f"its control {k + 1}"
            out.append(f"{sample.name}: {which} trains at {cw}×{ch} px and its target at {tw}×{th} px ({ratio:.1f}× "
                       "the area): predict sizes it the same way, but set data.control_size: target (or "
                       "data.control_max_pixels) to train at one scale")  # fmt: skip
    return out


def _identical(a: Image.Image, b: Image.Image) -> bool:
    """Equal to within one 8-bit level everywhere."""
    x, y = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    return bool(np.abs(x - y).max() <= 1)


def dataset_notes(samples: Sequence[PairSample]) -> list[str]:
    """Notes about the dataset as a whole (not warnings)."""
    prompts = {s.prompt.strip() for s in samples}
    if len(samples) > 1 and len(prompts) == 1:
        return [f"note: all {len(samples)} pairs have the instruction {next(iter(prompts))!r} (one edit; "
                "varied wording generalizes better)"]  # fmt: skip
    return []


def check_pairs(samples: Iterable[PairSample], *, progress: Callable[[Iterable[PairSample]], Iterable[PairSample]]
                = iter) -> list[str]:  # fmt: skip
    """Every pair's warnings (``warning: NAME: ...``), then the dataset's notes (``note: ...``): each
    pair's first control against its target, decoded at reduced size where the format allows."""
    samples = list(samples)
    out: list[str] = []
    for s in progress(samples):
        if not s.controls:
            continue
        out += [f"warning: {w}" for w in size_warnings(s)]
        control, target = load_rgb(s.control, draft=SIDE * 2), load_rgb(s.target, draft=SIDE * 2)
        out += [f"warning: {w}" for w in pair_warnings(s.name, control, target, s.prompt,
                                                        target_width=image_size(s.target)[0])]  # fmt: skip
    return out + dataset_notes(samples)


def summary(pairs: int, warnings: Sequence[str]) -> str:
    """The check's last line."""
    problems = [w for w in warnings if w.startswith("warning:")]
    named = len({w.split(":", 2)[1] for w in problems})
    if not problems:
        return f"check: {pairs} pairs, no warnings"
    return f"check: {pairs} pairs, {len(problems)} warning(s) on {named} pair(s); training would still run"
