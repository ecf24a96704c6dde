"""The Qwen-Image-Edit cache: the prompt embedding is keyed by the control images as well as the
text, cached conditioning equals freshly encoded conditioning, and exactly what changed is recomputed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from qflux.data.dataset import PairDataset
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import PROMPT, make_synthetic_pairs
from qflux.models.qwen_image_edit import cache as qcache
from qflux.models.qwen_image_edit.batch import (
    QwenPairDataset,
    cached_conditioning,
    collate_qwen_pairs,
    encode_conditioning,
)
from qflux.models.qwen_image_edit.loaders import load_qwen_image_edit
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.train.cache import CacheReport, EntryDataset, fill_entries


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("qwen"), seed=0, variant="edit_plus")


@pytest.fixture(scope="module")
def models(model: Path):
    return load_qwen_image_edit(model, torch.float32, include=("vae", "text_encoder"))


def _fill(model: Path, models, data: Path, root: Path, variant: str = "edit") -> CacheReport:
    spec = qcache.cache_spec(model, "float32", variant)
    return fill_entries(qcache.jobs(models, spec, root, scan_pairs(data, None, multiple=16, controls=(0, 3))))


def test_same_prompt_different_images_differ_cached_and_uncached(model: Path, models, tmp_path: Path) -> None:
    data = make_synthetic_pairs(tmp_path / "data", 2, seed=0, sizes=((64, 64),))  # one size: one batch
    samples = scan_pairs(data, None, multiple=16)
    assert samples[0].prompt == samples[1].prompt == PROMPT
    spec = qcache.cache_spec(model, "float32", "edit")
    fill_entries(qcache.jobs(models, spec, tmp_path / "cache", samples))
    entries = qcache.sample_entries(spec, tmp_path / "cache", samples)
    assert entries[0].prompt.path != entries[1].prompt.path  # keyed by the images, not the text alone

    cached_ds = EntryDataset(entries, qcache.read_sample)
    cached = cached_conditioning(qcache.collate_cached([cached_ds[0], cached_ds[1]]))
    fresh_ds = QwenPairDataset(PairDataset(samples), "edit")
    fresh = encode_conditioning(models, collate_qwen_pairs([fresh_ds[0], fresh_ds[1]]), "edit")
    for cond in (cached, fresh):
        embeds, mask = cond.text["embeds"], cond.text["mask"]
        assert embeds.shape[0] == 2 and bool(mask.all())
        assert (embeds[0] - embeds[1]).abs().max() > 1e-3  # each sample saw its own control image
    for key in ("embeds", "mask"):
        assert torch.equal(cached.text[key], fresh.text[key])
        assert torch.equal(cached.empty[key], fresh.empty[key])  # type: ignore[index]
    assert torch.equal(cached.latents, fresh.latents) and torch.equal(cached.controls[0], fresh.controls[0])


def test_recompute_counts(model: Path, models, tmp_path: Path) -> None:
    data = make_synthetic_pairs(tmp_path / "data", 3, seed=0)
    controls = data / "control_images"
    ImageOps.mirror(Image.open(controls / "sample_000.png")).save(controls / "sample_000_control_1.png")
    root = tmp_path / "cache"
    # per sample: target + each control latent + prompt + empty-instruction embeddings
    first = _fill(model, models, data, root, "edit_plus")
    assert (first.computed, first.reused) == (5 + 4 + 4, 0)
    again = _fill(model, models, data, root, "edit_plus")
    assert (again.computed, again.reused) == (0, 13)

    # an edited second control image: its latent and the sample's two embeddings
    ImageOps.flip(Image.open(controls / "sample_000.png")).save(controls / "sample_000_control_1.png")
    assert _fill(model, models, data, root, "edit_plus").computed == 3
    # an edited instruction: that prompt's embedding only (the empty instruction is unchanged)
    (data / "training_images" / "sample_001.txt").write_text("make it darker\n")
    assert _fill(model, models, data, root, "edit_plus").computed == 1
    # Qwen-Image-Edit instead of Edit-Plus: another template and vision input, every embedding
    edit_data = tmp_path / "edit"
    shutil.copytree(data, edit_data)
    (edit_data / "control_images" / "sample_000_control_1.png").unlink()
    report = fill_entries(
        qcache.jobs(models, qcache.cache_spec(model, "float32", "edit"), root, scan_pairs(edit_data, None, multiple=16))
    )
    assert (report.computed, report.reused) == (6, 6)

    # other processor settings (the vision encoder's pixel bounds): every embedding, no latent
    other = tmp_path / "other-model"
    shutil.copytree(model, other)
    other_models = load_qwen_image_edit(other, torch.float32, include=("vae", "text_encoder"))
    assert _fill(other, other_models, data, root, "edit_plus").reused == 0  # another folder: its own entries
    config = other / "processor" / "processor_config.json"
    settings = json.loads(config.read_text())
    settings["image_processor"]["size"]["longest_edge"] = 28 * 28 * 16
    config.write_text(json.dumps(settings))
    other_models = load_qwen_image_edit(other, torch.float32, include=("vae", "text_encoder"))
    moved = _fill(other, other_models, data, root, "edit_plus")
    assert (moved.computed, moved.reused) == (6, 7)

    # a truncated entry is recomputed and reported
    entries = qcache.sample_entries(qcache.cache_spec(model, "float32", "edit_plus"), root,
                                    scan_pairs(data, None, multiple=16, controls=(0, 3)))  # fmt: skip
    path = entries[2].prompt.path
    path.write_bytes(path.read_bytes()[:-7])
    report = _fill(model, models, data, root, "edit_plus")
    assert report.computed == 1 and "truncated" in report.replaced[0]
