"""The Kontext embedding cache: exactly the affected entries are recomputed, corrupt entries are
replaced, and training from the cache equals training without it."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.errors import QfluxError
from qflux.config.parse import load_config
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext import cache as kcache
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.train.cache import EntryDataset
from recipes.flux_kontext_lora import cache as fill
from recipes.flux_kontext_lora import train as run


def _cfg(data: Path, cache: Path, model: Path, **extra: object) -> FluxKontextConfig:
    overrides = {
        "model.pretrained_model_name_or_path": str(model),
        "model.dtype": "float32",
        "model.max_sequence_length": 16,
        "data.dataset_path": str(data),
        "train.loss_mask": "none",  # the counts below are latents and prompts (change masks: test_loss_mask.py)
        "cache.cache_dir": str(cache),
        "devices.vae": "cpu",
        "devices.text_encoder": "cpu",
        "devices.text_encoder_2": "cpu",
        "devices.transformer": "cpu",
        **extra,
    }
    return load_config(FluxKontextConfig, None, overrides)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = make_synthetic_pairs(tmp_path / "data", 4, seed=0)
    # one large pair, so that max_pixels affects it alone
    rng = np.random.default_rng(5)
    big = Image.fromarray(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8))
    big.save(root / "control_images" / "big.png")
    big.save(root / "training_images" / "big.png")
    (root / "training_images" / "big.txt").write_text("make it big\n")
    return root


def test_counts_and_exact_recompute(dataset: Path, tmp_path: Path, tiny_flux_dir: Path) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(dataset, cache, tiny_flux_dir, **{"data.buckets": "exact"})
    # 5 targets + 5 controls + 2 prompts × (CLIP, T5) + the empty prompt × (CLIP, T5)
    first = fill(cfg)
    assert (first.computed, first.reused) == (16, 0)
    again = fill(cfg)
    assert (again.computed, again.reused) == (0, 16)

    # a control image edited in place: its control latent alone
    img = Image.open(dataset / "control_images" / "sample_001.png").convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(dataset / "control_images" / "sample_001.png")
    assert fill(cfg).computed == 1

    # a prompt edited in place: its CLIP and T5 entries
    (dataset / "training_images" / "sample_002.txt").write_text("make it red\n")
    assert fill(cfg).computed == 2

    # max_pixels that shrinks only the large pair: its target and control latents
    assert (
        fill(_cfg(dataset, cache, tiny_flux_dir, **{"data.max_pixels": 96 * 96, "data.buckets": "exact"})).computed == 2
    )

    # another T5 length: every T5 entry (3 prompts + empty), nothing else
    assert (
        fill(_cfg(dataset, cache, tiny_flux_dir, **{"model.max_sequence_length": 8, "data.buckets": "exact"})).computed
        == 4
    )

    # another model folder: everything
    other = tmp_path / "other-model"
    shutil.copytree(tiny_flux_dir, other)
    report = fill(_cfg(dataset, cache, other, **{"data.buckets": "exact"}))
    assert (report.computed, report.reused) == (18, 0)


def test_a_change_of_buckets_recomputes_just_the_latents_whose_geometry_changed(
    dataset: Path, tmp_path: Path, tiny_flux_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    assert fill(_cfg(dataset, cache, tiny_flux_dir, **{"data.buckets": "exact"})).computed == 16
    # auto buckets at the largest target's area (160²): the four small pairs are scaled up into
    # buckets (8 latents); the big pair's bucket is its own size, uncropped (the exact key: reused)
    report = fill(_cfg(dataset, cache, tiny_flux_dir, **{"data.max_pixels": None}))
    assert (report.computed, report.reused) == (8, 8)
    assert "4 pair(s) are upscaled more than 2× to their bucket" in capsys.readouterr().out
    # buckets of 64² area: the small pairs are their own sizes again (their exact entries), the big
    # pair is scaled down into the 64×64 bucket (2 latents)
    report = fill(_cfg(dataset, cache, tiny_flux_dir, **{"data.max_pixels": 64 * 64}))
    assert (report.computed, report.reused) == (2, 14)


def test_corrupt_entry_is_recomputed(dataset: Path, tmp_path: Path, tiny_flux_dir: Path) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(dataset, cache, tiny_flux_dir)
    fill(cfg)
    victim = sorted((cache / "pixel_latent").rglob("*.safetensors"))[0]
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    report = fill(cfg)
    assert report.computed == 1 and len(report.replaced) == 1 and "truncated" in report.replaced[0]
    assert victim.read_bytes() == good


def test_same_prompt_different_controls_share_only_image_independent_entries(
    dataset: Path, tmp_path: Path, tiny_flux_dir: Path
) -> None:
    from qflux.data.pairs import scan_pairs

    samples = scan_pairs(dataset, None, multiple=16)
    a, b = (s for s in samples if s.name in ("sample_000", "sample_002"))
    assert a.prompt == b.prompt
    spec = kcache.cache_spec(tiny_flux_dir, "float32", 16)
    ea, eb = kcache.sample_entries(spec, tmp_path, [a, b])
    assert ea.control.path != eb.control.path and ea.target.path != eb.target.path
    # FLUX's text encoders never see the image: the prompt entries are legitimately shared
    assert ea.clip.path == eb.clip.path and ea.t5.path == eb.t5.path


def test_training_fills_missing_and_corrupt_entries_first(
    dataset: Path, tmp_path: Path, tiny_flux_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    extra = {"cache.use_cache": True, "train.max_train_steps": 1, "logging.write_sample": False}
    cfg = _cfg(dataset, cache, tiny_flux_dir, **extra, **{"logging.output_dir": str(tmp_path / "o")})
    run(cfg)
    out = capsys.readouterr().out
    assert "16 entries missing or corrupt" in out and "16 entries computed, 0 reused" in out
    victim = sorted((cache / "t5_prompt_embed").rglob("*.safetensors"))[0]
    victim.write_bytes(b"")
    result = run(attrs.evolve(cfg, logging=attrs.evolve(cfg.logging, overwrite=True)))
    out = capsys.readouterr().out
    assert "1 entries missing or corrupt" in out and "recomputed corrupt entry" in out
    assert result.models.vae is None and victim.stat().st_size > 0


def test_entry_damaged_during_training_stops_with_its_name(dataset: Path, tmp_path: Path, tiny_flux_dir: Path) -> None:
    from qflux.data.pairs import scan_pairs

    cfg = _cfg(dataset, tmp_path / "cache", tiny_flux_dir)
    fill(cfg)
    spec = kcache.cache_spec(tiny_flux_dir, "float32", 16)
    entries = kcache.sample_entries(spec, tmp_path / "cache", scan_pairs(dataset, None, multiple=16))
    entries[0].control.path.write_bytes(b"garbage")
    with pytest.raises(QfluxError, match=r"cache entry unusable during training: .*control_latent.*rerun the cache"):
        EntryDataset(entries, kcache.read_sample)[0]


def test_training_from_cache_equals_training_without(tmp_path: Path, tiny_flux_dir: Path) -> None:
    data = make_synthetic_pairs(tmp_path / "data", 6, seed=3)
    common = {
        "train.max_train_steps": 4,
        "data.caption_dropout_rate": 0.5,
        "data.prompt_image_dropout_rate": 0.3,
        "train.gradient_accumulation_steps": 2,
    }
    plain = run(_cfg(data, tmp_path / "c", tiny_flux_dir, **common, **{"logging.output_dir": str(tmp_path / "p")}))
    cached_cfg = _cfg(
        data,
        tmp_path / "c",
        tiny_flux_dir,
        **common,
        **{"cache.use_cache": True, "logging.output_dir": str(tmp_path / "q")},
    )
    fill(cached_cfg)
    cached = run(cached_cfg)
    assert cached.models.vae is None and cached.models.text_encoder is None and cached.models.text_encoder_2 is None
    # the acceptance bound is a relative loss difference <= 1e-5; in fact both paths are bit-identical
    np.testing.assert_allclose(cached.losses, plain.losses, rtol=1e-5)
    assert cached.losses == plain.losses
    assert all(torch.equal(cached.state.lora[k], plain.state.lora[k]) for k in plain.state.lora)
