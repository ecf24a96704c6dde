"""Bad data is found before any model loads, each problem named with its file; odd but valid
images (CMYK, palette, RGBA, 16-bit, EXIF-rotated) are decoded correctly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qflux.config.errors import QfluxError
from qflux.data.images import load_rgb
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import make_synthetic_pairs


def _data(tmp_path: Path) -> Path:
    return make_synthetic_pairs(tmp_path / "data", 3, seed=0)


def _missing_control(d: Path) -> Path:
    (d / "control_images" / "sample_001.png").unlink()
    return d / "control_images" / "sample_001"


def _missing_target(d: Path) -> Path:
    (d / "training_images" / "sample_001.png").unlink()
    return d / "training_images" / "sample_001"


def _missing_prompt(d: Path) -> Path:
    (d / "training_images" / "sample_001.txt").unlink()
    return d / "training_images" / "sample_001.txt"


def _empty_prompt(d: Path) -> Path:
    (d / "training_images" / "sample_001.txt").write_text(" \n")
    return d / "training_images" / "sample_001.txt"


def _not_utf8(d: Path) -> Path:
    (d / "training_images" / "sample_001.txt").write_bytes("café".encode("latin-1"))
    return d / "training_images" / "sample_001.txt"


def _zero_bytes(d: Path) -> Path:
    (d / "control_images" / "sample_001.png").write_bytes(b"")
    return d / "control_images" / "sample_001.png"


def _truncated(d: Path) -> Path:
    p = d / "training_images" / "sample_001.png"
    p.write_bytes(p.read_bytes()[:200])
    return p


def _unreadable(d: Path) -> Path:
    p = d / "training_images" / "sample_001.png"
    p.write_bytes(b"this is not an image at all")
    return p


def _tiny(d: Path) -> Path:
    p = d / "control_images" / "sample_001.png"
    Image.new("RGB", (12, 40)).save(p)
    return p


def _duplicate_stem(d: Path) -> Path:
    Image.new("RGB", (64, 64)).save(d / "control_images" / "sample_001.jpg")
    return d / "control_images" / "sample_001.jpg"


BAD: dict[str, Callable[[Path], Path]] = {
    "missing control": _missing_control,
    "missing target": _missing_target,
    "missing prompt": _missing_prompt,
    "empty prompt": _empty_prompt,
    "prompt not UTF-8": _not_utf8,
    "0-byte image": _zero_bytes,
    "truncated image": _truncated,
    "unreadable image": _unreadable,
    "image under 16 px": _tiny,
    "duplicate stems": _duplicate_stem,
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_problem_names_its_file(tmp_path: Path, kind: str) -> None:
    d = _data(tmp_path)
    named = BAD[kind](d)
    with pytest.raises(QfluxError) as info:
        scan_pairs(d, None, multiple=16)
    msg = str(info.value)
    assert "1 problem(s)" in msg and str(named) in msg
    warnings: list[str] = []
    kept = scan_pairs(d, None, multiple=16, skip_invalid=True, warn=warnings.append)
    assert [s.name for s in kept] == ["sample_000", "sample_002"]
    assert len(warnings) == 1 and str(named) in warnings[0]


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "control_images").mkdir()
    (tmp_path / "training_images").mkdir()
    with pytest.raises(QfluxError, match="holds no usable samples"):
        scan_pairs(tmp_path, None, multiple=16)
    d = _data(tmp_path / "x")
    for p in (d / "control_images").iterdir():
        p.unlink()
    with pytest.raises(QfluxError, match="holds no usable samples"):
        scan_pairs(d, None, multiple=16, skip_invalid=True, warn=lambda _: None)


def _rgb_array(h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cmyk_palette_rgba_16bit_and_exif_are_decoded(tmp_path: Path) -> None:
    rgb = Image.fromarray(_rgb_array())
    cmyk = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(cmyk, quality=100)
    out = np.asarray(load_rgb(cmyk), dtype=np.int32)
    assert out.shape == (20, 24, 3) and np.abs(out - np.asarray(rgb, dtype=np.int32)).mean() < 12

    pal = tmp_path / "pal.png"
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(pal)
    assert load_rgb(pal).mode == "RGB"
    assert np.array_equal(np.asarray(load_rgb(pal)), np.asarray(Image.open(pal).convert("RGB")))

    pal_t = tmp_path / "pal_t.png"
    p = Image.new("P", (4, 4), 0)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p.save(pal_t, transparency=0)
    px = np.asarray(load_rgb(pal_t))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[1, 1]) == (0, 0, 255)

    grey16 = tmp_path / "g16.png"
    Image.fromarray(np.full((20, 24), 65535 // 2, dtype=np.uint16)).save(grey16)
    g = np.asarray(load_rgb(grey16))
    assert g.shape == (20, 24, 3) and abs(int(g[0, 0, 0]) - 128) <= 1

    rgba = tmp_path / "rgba.png"
    a = np.zeros((20, 24, 4), dtype=np.uint8)
    a[..., 0] = 255
    a[:10, :, 3] = 255
    Image.fromarray(a, "RGBA").save(rgba)
    px = np.asarray(load_rgb(rgba))
    assert tuple(px[0, 0]) == (255, 0, 0) and tuple(px[15, 0]) == (255, 255, 255)

    rot = tmp_path / "rot.jpg"
    exif = rgb.getexif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise on display
    rgb.save(rot, exif=exif.tobytes(), quality=100)
    assert load_rgb(rot).size == (20, 24)


def test_odd_modes_pass_validation(tmp_path: Path) -> None:
    d = _data(tmp_path)
    img = Image.open(d / "control_images" / "sample_000.png").convert("RGB")
    img.convert("CMYK").save(d / "control_images" / "sample_000.jpg")
    (d / "control_images" / "sample_000.png").unlink()
    Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)).save(d / "training_images" / "sample_000.png")
    samples = scan_pairs(d, None, multiple=16)
    assert [s.name for s in samples] == ["sample_000", "sample_001", "sample_002"]


def test_a_warning_that_repeats_is_one_line(tmp_path: Path) -> None:
    """Eight pairs of one odd size that trains in a bucket of its own: one line with the count and the first
    names, not one line per pair (as a held-out 128×96 dataset printed it)."""
    from qflux.data.synthetic import make_synthetic_pairs

    d = make_synthetic_pairs(tmp_path / "odd", 8, seed=0, sizes=((240, 40),))
    warnings: list[str] = []
    samples = scan_pairs(d, 240 * 40, multiple=16, buckets="auto", warn=warnings.append)
    assert len(samples) == 8
    own = [w for w in warnings if "bucket of their own" in w]
    assert len(own) == 1 and own[0].startswith("8 pair(s) train in a bucket of their own")
    assert "sample_000 (240×40 → " in own[0] and own[0].endswith("(+5 more)")
