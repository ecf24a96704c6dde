"""Aspect-ratio buckets in training: a folder where every pair has its own size still trains at the
configured batch size (``train/samples``), ``drop_last`` keeps only full batches, the start block
prints the bucket table, cached and uncached training see the same cropped pixels, and Edit-Plus
samples whose control images differ in size batch together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageOps

from qflux.config.parse import load_config
from qflux.data.synthetic import draw_scene, make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from recipes.flux_kontext_lora import cache as flux_cache
from recipes.flux_kontext_lora import train as flux_train

SQUARE = ((130, 128), (150, 146), (200, 190), (256, 250), (180, 180), (226, 220))
"""Six sizes near 1:1."""
WIDE = ((300, 200), (240, 160), (270, 182), (330, 220), (210, 140), (360, 240))
"""Six sizes near 3:2."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 pairs of 12 different sizes in two aspect families."""
    sizes = tuple(s for pair in zip(SQUARE, WIDE, strict=True) for s in pair)
    return make_synthetic_pairs(tmp_path_factory.mktemp("photos"), 12, seed=7, sizes=sizes)


def _flux(model: Path, data: Path, out: Path, **more: object) -> FluxKontextConfig:
    return load_config(
        FluxKontextConfig,
        None,
        {
            "model.pretrained_model_name_or_path": str(model),
            "model.dtype": "float32",
            "model.max_sequence_length": 8,
            "data.dataset_path": str(data),
            "data.batch_size": 4,
            "data.max_pixels": 128 * 128,
            "train.max_train_steps": 8,
            "logging.output_dir": str(out),
            "logging.write_sample": False,
            "logging.report_to": "jsonl",
            "cache.cache_dir": str(out.parent / "cache"),
            **more,
        },
    )


def _samples(out: Path) -> list[float]:
    """``train/samples`` of every step, from metrics.jsonl."""
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["train/samples"] for r in rows if "train/samples" in r]


def test_a_folder_of_mixed_sizes_fills_its_batches(
    photos: Path, tiny_flux_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flux_train(_flux(tiny_flux_dir, photos, tmp_path / "auto"))
    text = capsys.readouterr().out
    assert "12 pairs in 2 bucket(s)\n           128×128: 6 pairs\n           144×96: 6 pairs\n" in text
    counts = _samples(tmp_path / "auto")
    assert len(counts) == 8 and set(counts) == {4.0, 2.0}  # a bucket's last batch alone is short
    assert np.mean(counts) >= 2.5

    # exact sizes (before buckets): every pair alone in its size group, so batch_size 4 trains at 1
    exact = {"data.buckets": "exact", "data.max_pixels": None, "train.max_train_steps": 3}
    flux_train(_flux(tiny_flux_dir, photos, tmp_path / "exact", **exact))
    assert "12 pairs in 12 size group(s)" in capsys.readouterr().out
    assert _samples(tmp_path / "exact") == [1.0, 1.0, 1.0]

    # drop_last: the short batches go, every step trains on 4
    flux_train(_flux(tiny_flux_dir, photos, tmp_path / "full", **{"data.drop_last": True}))
    assert _samples(tmp_path / "full") == [4.0] * 8


def test_cached_training_sees_the_same_cropped_pixels(photos: Path, tiny_flux_dir: Path, tmp_path: Path) -> None:
    more = {"train.max_train_steps": 3, "data.caption_dropout_rate": 0.0, "data.prompt_image_dropout_rate": 0.0}
    plain = flux_train(_flux(tiny_flux_dir, photos, tmp_path / "p", **more))
    cfg = _flux(tiny_flux_dir, photos, tmp_path / "q", **more, **{"cache.use_cache": True})
    flux_cache(cfg)
    cached = flux_train(cfg)
    assert cached.losses == plain.losses
    assert all(torch.equal(cached.state.lora[k], plain.state.lora[k]) for k in plain.state.lora)


def test_drop_last_that_leaves_nothing_is_refused_before_loading(
    photos: Path, tiny_flux_dir: Path, tmp_path: Path
) -> None:
    from qflux.config.errors import QfluxError

    cfg = _flux(tiny_flux_dir, photos, tmp_path / "o", **{"data.batch_size": 7, "data.drop_last": True})
    with pytest.raises(QfluxError, match=r"no bucket holds 7 pairs.*lower data.batch_size or set data.drop_last"):
        flux_train(cfg)
    assert not (tmp_path / "o").exists()


def plus_with_mixed_controls(root: Path) -> Path:
    """Four Edit-Plus samples, each with a 3:2 target and two controls of other sizes and aspects
    (a near-square one and a tall one), every file at its own pixel size."""
    rng = np.random.default_rng(11)
    (root / "control_images").mkdir(parents=True)
    (root / "training_images").mkdir(parents=True)
    for i, (target, square, tall) in enumerate(
        [((150, 100), (96, 90), (70, 110)), ((165, 110), (100, 100), (63, 99)),
         ((180, 120), (110, 104), (77, 121)), ((141, 94), (90, 88), (56, 88))]
    ):  # fmt: skip
        name = f"sample_{i:03d}"
        picture = draw_scene(rng, target)
        ImageOps.invert(picture).save(root / "training_images" / f"{name}.png")
        (root / "training_images" / f"{name}.txt").write_text("invert the colors of the image\n")
        picture.resize(square).save(root / "control_images" / f"{name}.png")
        draw_scene(rng, tall).save(root / "control_images" / f"{name}_control_1.png")
    return root


def test_edit_plus_samples_with_controls_of_other_sizes_batch_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
    from recipes.qwen_image_edit_lora import cache as qwen_cache
    from recipes.qwen_image_edit_lora import train as qwen_train

    model = build_qwen_image_edit(tmp_path / "model", seed=0, variant="edit_plus")
    data = plus_with_mixed_controls(tmp_path / "data")

    def cfg(out: str, **more: object) -> QwenImageEditConfig:
        return load_config(
            QwenImageEditConfig,
            None,
            {"model.pretrained_model_name_or_path": str(model), "model.dtype": "float32", "model.variant": "edit_plus",
             "data.dataset_path": str(data), "data.batch_size": 2, "train.max_train_steps": 2,
             "logging.output_dir": str(tmp_path / out), "logging.write_sample": False, "logging.report_to": "jsonl",
             "cache.cache_dir": str(tmp_path / "cache"), **more},
        )  # fmt: skip

    plain = qwen_train(cfg("p"))
    # each control at its own aspect, as the pipeline sizes it (calculate_dimensions, multiples of 32, at the
    # buckets' area): samples whose controls come out alike batch together
    out = capsys.readouterr().out
    assert "4 pairs in 2 bucket(s)\n" in out
    assert (
        "176×112 (control 160×128, 128×192): 2 pairs\n" in out and "176×112 (control 160×160, 128×192): 2 pairs" in out
    )
    assert _samples(tmp_path / "p") == [2.0, 2.0]
    # data.control_size: target sizes every control like its target: one bucket for the four
    qwen_train(cfg("t", **{"data.control_size": "target"}))
    assert "4 pairs in 1 bucket(s)\n           176×112: 4 pairs\n" in capsys.readouterr().out
    # the cache keys each crop box, the vision-language inputs too: the same conditioning
    qwen_cache(cfg("q", **{"cache.use_cache": True}))
    cached = qwen_train(cfg("q", **{"cache.use_cache": True}))
    assert cached.losses == plain.losses
    assert all(torch.equal(cached.state.lora[k], plain.state.lora[k]) for k in plain.state.lora)


def test_a_repeated_bucket_warning_is_one_line_and_its_full_list_is_in_the_run_folder(
    tiny_flux_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Eight pairs of one size that trains in a bucket of its own: training prints the warning once (count and
    first names), and the run folder's data_warnings.txt names all eight."""
    data = make_synthetic_pairs(tmp_path / "odd", 8, seed=2, sizes=((240, 40),))
    flux_train(_flux(tiny_flux_dir, data, tmp_path / "out", **{"train.max_train_steps": 1}))
    text = capsys.readouterr().out
    assert text.count("train in a bucket of their own") == 1
    assert "8 pair(s) train in a bucket of their own" in text and "(+5 more)" in text
    listing = (tmp_path / "out" / "data_warnings.txt").read_text()
    assert all(f"  sample_{i:03d} (240×40 → " in listing for i in range(8))
