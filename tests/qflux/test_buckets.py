"""Aspect-ratio buckets: the properties every assignment keeps (hypothesis), and what scanning a
folder of mixed sizes gives each pair (bucket, crop box, control geometry)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qflux.data.buckets import (
    MAX_ASPECT,
    MAX_CROP,
    bucket_area,
    bucket_sizes,
    cover_box,
    crop_fraction,
    nearest_bucket,
    own_bucket,
)
from qflux.data.controls import ControlSizes
from qflux.data.dataset import PairDataset
from qflux.data.images import load_rgb
from qflux.data.pairs import scan_pairs

multiples = st.sampled_from([8, 16, 32])
sides = st.integers(16, 4096)


@st.composite
def table_and_source(draw: st.DrawFn) -> tuple[int, int, tuple[int, int]]:
    """(area, multiple, source size), the area at least an 8m × 8m square (128² for FLUX.1): below
    that, the multiple cannot approach every aspect within the crop bound."""
    m = draw(multiples)
    area = draw(st.integers(64 * m * m, 2048 * 2048))
    return area, m, (draw(sides), draw(sides))


@settings(max_examples=300, deadline=None)
@given(table_and_source())
def test_every_bucket_fits_the_area_with_sides_multiples_of_the_factor(case: tuple[int, int, tuple[int, int]]) -> None:
    area, m, source = case
    table = bucket_sizes(area, m)
    assert len(set(table)) == len(table)
    bucket, _ = nearest_bucket(source, table, area, m)
    for w, h in [*table, bucket]:
        assert w % m == 0 and h % m == 0 and w >= m and h >= m
        assert w * h <= area


@settings(max_examples=300, deadline=None)
@given(table_and_source())
def test_the_crop_stays_within_the_bound_inside_1_to_4(case: tuple[int, int, tuple[int, int]]) -> None:
    area, m, (w, h) = case
    if not 1 / MAX_ASPECT <= w / h <= MAX_ASPECT:
        return
    bucket, _ = nearest_bucket((w, h), bucket_sizes(area, m), area, m)
    assert crop_fraction((w, h), bucket) <= MAX_CROP
    # the box is the bucket's aspect, centred, inside the image, and removes exactly that fraction
    left, top, right, bottom = cover_box((w, h), bucket)
    assert 0 <= left < right <= w and 0 <= top < bottom <= h  # PIL refuses a box outside the image
    assert abs(left - (w - right)) < 1e-6 and abs(top - (h - bottom)) < 1e-6
    assert math.isclose((right - left) / (bottom - top), bucket[0] / bucket[1], rel_tol=1e-9)
    assert math.isclose(1 - (right - left) * (bottom - top) / (w * h), crop_fraction((w, h), bucket), abs_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(table_and_source())
def test_a_pair_goes_to_the_nearest_aspect_unless_that_crops_too_much(case: tuple[int, int, tuple[int, int]]) -> None:
    area, m, source = case
    table = bucket_sizes(area, m)
    bucket, own = nearest_bucket(source, table, area, m)
    distance = [abs(math.log(b[0] / b[1]) - math.log(source[0] / source[1])) for b in table]
    if own:
        assert min(crop_fraction(source, b) for b in table) > MAX_CROP
    else:
        assert bucket in table and distance[table.index(bucket)] == pytest.approx(min(distance))


def test_the_table_runs_from_1_to_4_to_4_to_1_at_1024_squared() -> None:
    table = bucket_sizes(1024 * 1024, 16)
    assert (1024, 1024) in table and len(table) == 17
    ratios = [w / h for w, h in table]
    assert ratios == sorted(ratios)
    assert ratios[0] == pytest.approx(1 / 4, rel=0.02) and ratios[-1] == pytest.approx(4, rel=0.02)
    assert all(w * h >= 0.95 * 1024 * 1024 for w, h in table)  # flooring loses under 5% of the area


def test_a_panorama_gets_its_own_bucket() -> None:
    area = 1024 * 1024
    bucket, own = nearest_bucket((8000, 1000), bucket_sizes(area, 16), area, 16)
    assert own and bucket == own_bucket((8000, 1000), area, 16)
    assert crop_fraction((8000, 1000), bucket) <= MAX_CROP and bucket[0] * bucket[1] <= area


def test_bucket_area_never_upscales_a_folder_of_small_images() -> None:
    assert bucket_area(1024 * 1024, [(64, 64), (80, 48)]) == 64 * 64
    assert bucket_area(512 * 512, [(4000, 3000)]) == 512 * 512
    assert bucket_area(None, [(300, 200)]) == 300 * 200


def _write(root: Path, name: str, size: tuple[int, int], control: tuple[int, int] | None = None, seed: int = 0) -> None:
    """A pair whose control is the very same picture when it has the target's size."""
    rng = np.random.default_rng(seed)
    picture = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    other = rng.integers(0, 256, (control[1], control[0], 3), dtype=np.uint8) if control else picture
    for folder, pixels in (("training_images", picture), ("control_images", other)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / folder / f"{name}.png")
    (root / "training_images" / f"{name}.txt").write_text("edit it\n")


def test_a_control_of_the_targets_size_keeps_pixel_alignment(tmp_path: Path) -> None:
    _write(tmp_path, "a", (310, 200))  # 1.55:1 into the nearest bucket: cropped
    _write(tmp_path, "b", (160, 160))
    for sizing in ("target", "own"):
        a, b = scan_pairs(tmp_path, 256 * 256, multiple=16, buckets="auto", control=ControlSizes(sizing))  # type: ignore[arg-type]
        assert a.target_box is not None and b.target_box is None
        assert a.control_sizes == (a.target_size,) and a.control_boxes == (a.target_box,)
        # control and target are one picture: after the crop and resize, still pixel for pixel
        item = PairDataset([a]).item(0, [load_rgb(a.control)])
        assert item["controls"][0].equal(item["target"])
        assert tuple(item["target"].shape[1:]) == a.target_size[::-1]


def test_controls_of_another_size_follow_the_models_rule(tmp_path: Path) -> None:
    _write(tmp_path, "a", (320, 240), control=(200, 300))
    (kontext,) = scan_pairs(tmp_path, 256 * 256, multiple=16, buckets="auto", control=ControlSizes("target"))
    (qwen,) = scan_pairs(tmp_path, 256 * 256, multiple=16, buckets="auto", control=ControlSizes("own"))
    assert kontext.control_sizes == (kontext.target_size,)  # Kontext: the target's bucket (cropped 2:3 → 4:3)
    w, h = qwen.control_sizes[0]  # Qwen: the bucket of its own aspect
    assert h > w and abs(math.log(w / h) - math.log(200 / 300)) < math.log(2) / 8 + 0.05
    assert qwen.target_size == kontext.target_size


def test_exact_keeps_every_image_whole(tmp_path: Path) -> None:
    _write(tmp_path, "a", (300, 200))
    (a,) = scan_pairs(tmp_path, None, multiple=16, buckets="exact")
    assert a.target_size == (288, 192) and a.target_box is None and a.control_crops == (None,)
