"""Training you can watch: validation grids and loss, TensorBoard scalars, the loss curve at
checkpoints, and the JSONL alternative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.train.plots import GRID_GAP, GRID_LABEL, grid_cell
from recipes.flux_kontext_lora import train as run


def _cfg(tmp_path: Path, tiny_flux_dir: Path, **extra) -> FluxKontextConfig:
    data = make_synthetic_pairs(tmp_path / "data", 4, seed=0)
    overrides = {
        "model.pretrained_model_name_or_path": str(tiny_flux_dir),
        "model.dtype": "float32",
        "model.max_sequence_length": 8,
        "data.dataset_path": str(data),
        "train.max_train_steps": 4,
        "train.checkpointing_steps": 2,
        "logging.output_dir": str(tmp_path / "out"),
        "logging.write_sample": False,
        **extra,
    }
    return load_config(FluxKontextConfig, None, overrides)


def test_validation_grids_and_tensorboard_scalars(tmp_path: Path, tiny_flux_dir: Path) -> None:
    held = make_synthetic_pairs(tmp_path / "held", 3, seed=5)
    control = held / "control_images" / "sample_000.png"
    cfg = _cfg(
        tmp_path,
        tiny_flux_dir,
        **{
            "validation.enabled": True,
            "validation.validation_steps": 2,
            "validation.num_inference_steps": 2,
            "validation.dataset_path": str(held),
            "validation.num_validation_samples": 2,
        },
    )
    run(cfg)
    out = tmp_path / "out"
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000000.png", "step-000002.png", "step-000004.png"]
    side = grid_cell([Image.open(control)])  # synthetic images are all this size or smaller
    for g in grids:
        w, h = Image.open(g).size
        assert (w, h) == (3 * side + 2 * GRID_GAP, 2 * (side + GRID_LABEL))  # 2 rows × (control, target, prediction)
    first, last = (Image.open(g).convert("RGB") for g in (grids[0], grids[-1]))
    pred = (2 * (side + GRID_GAP), GRID_LABEL, 3 * side + 2 * GRID_GAP, GRID_LABEL + side)
    # the prediction panel changes as the LoRA trains; the control panel does not
    assert first.crop(pred).tobytes() != last.crop(pred).tobytes()
    assert first.crop((0, 0, side, side)).tobytes() == last.crop((0, 0, side, side)).tobytes()

    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples",
        "train/steps_per_s",
        "train/samples_per_s",
        "val/loss",
    } <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/loss")] == [0, 2, 4]
    assert events.Tags()["images"] == ["val/grid"]
    assert (out / "loss.png").is_file() and (out / "checkpoint-2").is_dir()


def test_validation_loss_is_deterministic_and_samples_list_without_target(tmp_path: Path, tiny_flux_dir: Path) -> None:
    held = make_synthetic_pairs(tmp_path / "held", 2, seed=5)
    samples = [
        [str(held / "control_images" / "sample_000.png"), "invert", str(held / "training_images" / "sample_000.png")],
        [str(held / "control_images" / "sample_001.png"), "invert"],
    ]
    extra = {
        "validation.enabled": True,
        "validation.samples": samples,
        "validation.num_inference_steps": 1,
        "validation.validation_steps": 4,
        "logging.report_to": "jsonl",
        "train.max_train_steps": 2,
    }
    run(_cfg(tmp_path / "a", tiny_flux_dir, **extra))
    run(_cfg(tmp_path / "b", tiny_flux_dir, **extra))
    rows = [
        [json.loads(x) for x in (tmp_path / r / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
        for r in ("a", "b")
    ]
    val = [[x["val/loss"] for x in r if "val/loss" in x] for r in rows]
    assert val[0] == val[1] and len(val[0]) == 2  # before the first step and at the end
    grid = Image.open(tmp_path / "a" / "out" / "validation" / "step-000000.png")
    side = grid_cell([Image.open(samples[0][0])])
    assert grid.size == (3 * side + 2 * GRID_GAP, 2 * (side + GRID_LABEL))  # row 2 has no target panel


def test_validation_without_samples_is_refused_before_loading(tmp_path: Path, tiny_flux_dir: Path) -> None:
    with pytest.raises(QfluxError, match=r"validation\.dataset_path"):
        run(_cfg(tmp_path, tiny_flux_dir, **{"validation.enabled": True}))


def test_validation_from_the_cache_equals_validation_from_the_encoders(tmp_path: Path, tiny_flux_dir: Path) -> None:
    """With cache.use_cache the validation samples are cached with the training ones (the VAE is
    loaded only to decode), and the grids and losses are the uncached run's."""
    held = make_synthetic_pairs(tmp_path / "held", 2, seed=5)
    extra = {
        "validation.enabled": True,
        "validation.dataset_path": str(held),
        "validation.num_inference_steps": 1,
        "logging.report_to": "jsonl",
        "train.max_train_steps": 2,
        "train.checkpointing_steps": 0,
    }
    plain = run(_cfg(tmp_path / "plain", tiny_flux_dir, **extra))
    cached = run(
        _cfg(
            tmp_path / "cached",
            tiny_flux_dir,
            **extra,
            **{"cache.use_cache": True, "cache.cache_dir": str(tmp_path / "c")},
        )
    )
    assert cached.models.vae is None  # training held only the transformer
    assert plain.losses == cached.losses
    for run_dir in ("plain", "cached"):
        assert (tmp_path / run_dir / "out" / "validation" / "step-000002.png").is_file()
    logs = [
        [json.loads(x) for x in (tmp_path / r / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
        for r in ("plain", "cached")
    ]
    assert [x["val/loss"] for x in logs[0] if "val/loss" in x] == [x["val/loss"] for x in logs[1] if "val/loss" in x]
    grids = [(tmp_path / r / "out" / "validation" / "step-000002.png").read_bytes() for r in ("plain", "cached")]
    assert grids[0] == grids[1]
