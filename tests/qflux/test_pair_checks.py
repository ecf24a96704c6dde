"""Pair checks: the phase-correlation shift and scale estimates (hypothesis: known shifts within
1 px), and each warning on real decoded images."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from qflux.data.alignment import align
from qflux.data.checks import dataset_notes, pair_warnings, summary
from qflux.data.synthetic import draw_scene
from qflux.toy.edits import edited_pair
from qflux.toy.world import render


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A scene of shapes with photo-like noise (what phase correlation sees in real pairs)."""
    rng = np.random.default_rng(seed)
    scene = np.asarray(draw_scene(rng, size), dtype=np.int16)
    noise = rng.normal(0, 10, (size[1], size[0], 1)).astype(np.int16)
    return Image.fromarray(np.clip(scene + noise, 0, 255).astype(np.uint8))


CANVAS = _photo(0, (760, 640))


def _window(x: int, y: int, size: tuple[int, int] = (512, 384)) -> Image.Image:
    return CANVAS.crop((x, y, x + size[0], y + size[1]))


@settings(max_examples=40, deadline=None)
@given(dx=st.integers(-24, 24), dy=st.integers(-24, 24), invert=st.booleans(),
       size=st.sampled_from([(512, 384), (320, 320), (240, 400)]))  # fmt: skip
def test_the_shift_estimator_recovers_known_shifts_within_1px(dx: int, dy: int, invert: bool, size) -> None:  # type: ignore[no-untyped-def]
    control = _window(100, 100, size)
    target = _window(100 - dx, 100 - dy, size)  # the content moved by (dx, dy)
    a = align(control, ImageOps.invert(target) if invert else target)
    assert abs(a.dx - dx) <= 1 and abs(a.dy - dy) <= 1 and a.scale == 1.0


def test_a_reframed_target_is_scaled() -> None:
    control = _window(100, 100)
    zoomed = control.resize((int(512 * 1.06), int(384 * 1.06)), Image.Resampling.BILINEAR)
    w, h = zoomed.size
    target = zoomed.crop(((w - 512) // 2, (h - 384) // 2, (w - 512) // 2 + 512, (h - 384) // 2 + 384))
    assert align(control, target).scale == 1.06
    (line,) = pair_warnings("zoomed", control, target, "make it blue")
    assert line.startswith("zoomed: the target is scaled ×1.06")


def test_a_zoom_too_small_to_move_a_pixel_does_not_decide() -> None:
    # the built-in darken pairs (seed 0): on 64 px a 2% zoom moves no pixel by a whole pixel, so its peak
    # ties the unzoomed one to a few 1e-3 and the darkened shape used to tip it ("scaled ×0.98" on 12 of 64)
    rng = np.random.default_rng(0)
    for _ in range(64):
        before, after, prompt = edited_pair(rng, ["darken"])
        assert pair_warnings("pair", render(before), render(after), prompt) == []


def test_warnings_name_the_pair() -> None:
    control = _window(100, 100)
    assert pair_warnings("fine", control, ImageOps.invert(control), "invert the colors") == []
    # a local edit keeps the pair aligned
    edited = control.copy()
    edited.paste((255, 0, 0), (100, 100, 300, 250))
    assert pair_warnings("edited", control, edited, "add a red box") == []
    (shifted,) = pair_warnings("moved", control, _window(90, 104), "invert the colors")
    assert shifted.startswith("moved: the target is shifted by +10, -4 px")
    # reported in the file's pixels when it was decoded smaller
    (half,) = pair_warnings("moved", control.resize((256, 192)), _window(90, 104).resize((256, 192)), "x y z",
                            target_width=512)  # fmt: skip
    assert "+10, -4 px" in half
    (same,) = pair_warnings("same", control, control.copy(), "do nothing")
    assert same == "same: the target is identical to its control (nothing to learn from this pair)"
    wide = pair_warnings("wide", _window(0, 0, (600, 300)), control, "invert the colors")
    assert len(wide) == 1 and "differ by 33%" in wide[0]
    assert pair_warnings("short", control, ImageOps.invert(control), " x ") == [
        "short: the instruction 'x' is under 3 characters"
    ]
    # a global edit (a mirror) or another picture says nothing about alignment
    assert pair_warnings("flip", control, ImageOps.mirror(control), "mirror it") == []
    assert pair_warnings("other", control, _photo(7, (512, 384)), "replace it") == []


def test_the_summary_and_notes() -> None:
    from qflux.data.pairs import PairSample

    samples = [PairSample(f"p{i}", (), None, "invert", (), (8, 8)) for i in range(3)]  # type: ignore[arg-type]
    (note,) = dataset_notes(samples)
    assert note.startswith("note: all 3 pairs have the instruction 'invert'")
    assert summary(3, [note]) == "check: 3 pairs, no warnings"
    lines = ["warning: a: one", "warning: a: two", "warning: b: three", note]
    assert summary(3, lines) == "check: 3 pairs, 3 warning(s) on 2 pair(s); training would still run"
