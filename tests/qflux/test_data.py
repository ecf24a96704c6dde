"""The folder dataset: sizing, decoding, pairing errors, same-size batches, and keyed dropout draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from qflux.config.errors import QfluxError
from qflux.data.controls import fit_size
from qflux.data.dataset import PairDataset
from qflux.data.images import image_to_tensor, load_rgb
from qflux.data.order import batch_stream, epoch_batches
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import make_synthetic_pairs
from qflux.diffusion.rng import draw_sample_randomness, keyed_generator


@given(w=st.integers(1, 5000), h=st.integers(1, 5000), cap=st.one_of(st.none(), st.integers(256, 4_000_000)))
def test_fit_size_properties(w: int, h: int, cap: int | None) -> None:
    fw, fh = fit_size(w, h, cap, 16)
    assert fw % 16 == 0 and fh % 16 == 0 and fw >= 16 and fh >= 16
    if w >= 16 and h >= 16:
        assert fw <= w and fh <= h
    if cap is not None and min(fw, fh) > 16:
        assert fw * fh <= cap
    # the aspect is kept up to the flooring to 16, so only where the scaled-down sides stay >= 64 px
    scaled_min = min(w, h) * (cap / (w * h)) ** 0.5 if cap is not None else min(w, h)
    if cap is not None and w * h > cap and scaled_min >= 64 and max(w, h) / min(w, h) < 4:
        assert abs(fw / fh - w / h) / (w / h) < 0.35


def test_fit_size_examples() -> None:
    assert fit_size(70, 52, None, 16) == (64, 48)
    assert fit_size(2048, 1024, 1024 * 1024, 16) == (1440, 720)


def _write(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_scan_pairs_sorted_with_sizes(tmp_path: Path) -> None:
    make_synthetic_pairs(tmp_path, 5, seed=0)
    samples = scan_pairs(tmp_path, None, multiple=16)
    assert [s.name for s in samples] == [f"sample_{i:03d}" for i in range(5)]
    assert samples[0].target_size == (64, 64) and samples[1].target_size == (80, 48)
    assert samples[0].prompt == "invert the colors of the image"


def test_scan_pairs_lists_every_problem(tmp_path: Path) -> None:
    make_synthetic_pairs(tmp_path, 3, seed=0)
    (tmp_path / "control_images" / "sample_000.png").unlink()
    (tmp_path / "training_images" / "sample_001.txt").unlink()
    (tmp_path / "training_images" / "sample_002.txt").write_text("  \n")
    with pytest.raises(QfluxError) as info:
        scan_pairs(tmp_path, None, multiple=16)
    msg = str(info.value)
    assert "3 problem(s)" in msg
    assert "control_images/sample_000.<png|jpg|jpeg|webp>: missing image for sample 'sample_000'" in msg
    assert "sample_001.txt: missing instruction file" in msg
    assert "sample_002.txt: the instruction is empty" in msg


def test_scan_pairs_layout_and_empty(tmp_path: Path) -> None:
    with pytest.raises(QfluxError, match="must contain control_images/ and training_images/"):
        scan_pairs(tmp_path, None, multiple=16)
    (tmp_path / "control_images").mkdir()
    (tmp_path / "training_images").mkdir()
    with pytest.raises(QfluxError, match="holds no usable samples"):
        scan_pairs(tmp_path, None, multiple=16)


def test_load_rgb_composites_alpha_on_white_and_applies_exif(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(load_rgb(_write(tmp_path / "a.png", rgba)))
    assert out.shape == (10, 20, 3)
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[5, 5]) == (255, 255, 255)

    img = Image.new("RGB", (30, 10), (0, 255, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif.tobytes())
    assert load_rgb(path).size == (10, 30)
    from qflux.data.images import image_size

    assert image_size(path) == (10, 30)


def test_image_tensor_matches_pipeline_preprocessing(flux_pipe) -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (52, 70, 3), dtype=np.uint8))
    ours = image_to_tensor(img, (64, 48))
    ref = flux_pipe.image_processor.preprocess(flux_pipe.image_processor.resize(img, 48, 64), 48, 64)
    assert ours.shape == (1, 3, 48, 64)
    assert torch.equal(ours, ref)


def test_batches_group_sizes_and_depend_only_on_seed_epoch(tmp_path: Path) -> None:
    make_synthetic_pairs(tmp_path, 11, seed=0)
    samples = scan_pairs(tmp_path, None, multiple=16)
    a = epoch_batches(samples, 2, seed=3, epoch=1, shuffle=True)
    assert a == epoch_batches(samples, 2, seed=3, epoch=1, shuffle=True)
    assert a != epoch_batches(samples, 2, seed=3, epoch=2, shuffle=True)
    assert sorted(i for b in a for i in b) == list(range(11))
    for b in a:
        assert len({(samples[i].control_size, samples[i].target_size) for i in b}) == 1
    stream = batch_stream(PairDataset(samples), samples, 2, seed=3, shuffle=True, num_workers=0)
    _, first = next(stream)
    assert first["index"] == epoch_batches(samples, 2, seed=3, epoch=0, shuffle=True)[0]
    assert first["target"].shape[0] == len(first["index"])
    item = PairDataset(samples)[0]
    assert item["target"].min() >= -1 and item["target"].max() <= 1


@settings(max_examples=100, deadline=None)
@given(
    groups=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    batch=st.integers(1, 4),
    seed=st.integers(0, 99),
    drop_last=st.booleans(),
)
def test_batches_are_full_except_each_buckets_last(groups: list[int], batch: int, seed: int, drop_last: bool) -> None:
    from qflux.data.pairs import PairSample

    samples = [
        PairSample(f"s{g}_{i}", (Path("c"),), Path("t"), "p", ((16 * (g + 1), 16),), (16 * (g + 1), 16))
        for g, n in enumerate(groups)
        for i in range(n)
    ]
    batches = epoch_batches(samples, batch, seed=seed, epoch=0, shuffle=True, drop_last=drop_last)
    short = [b for b in batches if len(b) < batch]
    assert not (drop_last and short)
    assert len(short) == (0 if drop_last else sum(n % batch != 0 for n in groups))  # one per bucket at most
    covered = sorted(i for b in batches for i in b)
    expected = sum((n - n % batch if drop_last else n) for n in groups)
    assert len(covered) == len(set(covered)) == expected
    assert all(len({samples[i].target_size for i in b}) == 1 for b in batches)


def test_keyed_generators_are_independent_and_reproducible() -> None:
    a = torch.rand(4, generator=keyed_generator(0, 1, 2))
    assert torch.equal(a, torch.rand(4, generator=keyed_generator(0, 1, 2)))
    assert not torch.equal(a, torch.rand(4, generator=keyed_generator(0, 2, 1)))


@pytest.mark.parametrize(("caption", "image"), [(0.0, 0.0), (0.3, 0.0), (0.0, 0.6), (1.0, 1.0)])
def test_dropout_draws_really_happen_at_the_rate(caption: float, image: float) -> None:
    kw = {"timestep_sampling": "uniform", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}
    drops_c, drops_i = [], []
    for step in range(100):
        d = draw_sample_randomness(
            (0, step, 0), 4, (4, 2, 2), caption_dropout_rate=caption, image_dropout_rate=image, **kw
        )  # type: ignore[arg-type]
        drops_c.append(d.drop_caption)
        drops_i.append(d.drop_image)
        assert d.noise.shape == (4, 4, 2, 2) and d.u.shape == (4,)
    rate_c = torch.cat(drops_c).float().mean().item()
    rate_i = torch.cat(drops_i).float().mean().item()
    assert abs(rate_c - caption) < 0.08 and abs(rate_i - image) < 0.08
