"""``train.loss_mask`` on real folders: mask files follow the bucket's crop onto the latent grid, the
auto mask finds a known edited region, training with either runs for both models and differs
from the unmasked run, bad mask files are dataset errors, and the cache holds the masks (a cached run
trains the same LoRA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from qflux.config.errors import QfluxError
from qflux.data.dataset import PairDataset
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import draw_scene
from recipes import flux_kontext_lora, qwen_image_edit_lora
from tests.flux_kontext_batches import TINY, tiny_args


def _edited_pairs(root: Path, n: int = 2, size: tuple[int, int] = (64, 48)) -> Path:
    """Pairs whose edit paints a red square in the top-left quarter; masks/ marks it."""
    for sub in ("control_images", "training_images", "masks"):
        (root / sub).mkdir(parents=True)
    w, h = size
    for i in range(n):
        control = draw_scene(np.random.default_rng(i), size)
        target = control.copy()
        target.paste((255, 0, 0), (0, 0, w // 2, h // 2))
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, w // 2, h // 2))
        control.save(root / "control_images" / f"p{i}.png")
        target.save(root / "training_images" / f"p{i}.png")
        mask.save(root / "masks" / f"p{i}.png")
        (root / "training_images" / f"p{i}.txt").write_text("paint the top left corner red")
    return root


def test_mask_files_follow_the_buckets_crop(tmp_path: Path) -> None:
    data = _edited_pairs(tmp_path / "d", n=1, size=(200, 96))  # 2.08:1, cropped into a 2:1 bucket
    (sample,) = scan_pairs(data, 192 * 96, multiple=16, buckets="auto")
    assert sample.mask == data / "masks" / "p0.png" and sample.target_box is not None
    item = PairDataset([sample], mask_mode="masks", vae_factor=8)[0]
    w, h = sample.target_size
    assert item["mask"].shape == (1, h // 8, w // 8)
    # the mask file cropped like the target, then area-averaged: white where the target's crop is
    left, _, right, _ = sample.target_box  # type: ignore[misc]
    white_right = (100 - left) / (right - left) * (w // 8)  # the file's white part ends at x = 100
    cols = item["mask"][0, 0]
    assert cols[: int(white_right)].min() > 0.95 and cols[int(white_right) + 1 :].max() < 0.05  # bilinear edges
    assert item["mask"][0, : h // 16].mean() > 0.4 and item["mask"][0, h // 8 - 1].max() < 0.05
    auto = PairDataset([sample], mask_mode="auto", vae_factor=8)[0]["mask"]
    assert auto[0, 0, 0] == 1.0 and auto[0, -1, -1] < 0.5  # the painted corner changed, the far corner not


def test_bad_mask_files_are_dataset_errors(tmp_path: Path) -> None:
    data = _edited_pairs(tmp_path / "d", n=2)
    Image.new("L", (32, 32)).save(data / "masks" / "p0.png")
    Image.new("L", (64, 48)).save(data / "masks" / "p1.jpg")
    with pytest.raises(QfluxError) as info:
        scan_pairs(data, None, multiple=16)
    text = str(info.value)
    assert "p0.png: 32×32, but its target is 64×48" in text and "sample 'p1' has several masks" in text


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora])
def test_masked_training_runs_and_differs(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _edited_pairs(tmp_path / "d")
    loras = {}
    for mode in ("none", "masks", "auto"):
        out = tmp_path / mode
        recipe.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={out}", "--train.max_train_steps=2",
                     f"--train.loss_mask={mode}", "--logging.write_sample=false", "--model.dtype=float32",
                     *tiny_args(recipe, data=False)])  # fmt: skip
        loras[mode] = load_file(out / "pytorch_lora_weights.safetensors")
    for mode in ("masks", "auto"):
        assert any(not torch.equal(loras["none"][k], loras[mode][k]) for k in loras["none"]), mode


@pytest.mark.parametrize("recipe", [flux_kontext_lora, qwen_image_edit_lora])
def test_a_cached_masked_run_trains_what_the_uncached_one_does(recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _edited_pairs(tmp_path / "d")
    loras = []
    for cached in (False, True, True):  # the second cached run reads the masks the first computed
        out = tmp_path / f"out{len(loras)}"
        recipe.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={out}", "--train.max_train_steps=2",
                     "--train.loss_mask=auto", f"--cache.use_cache={str(cached).lower()}", "--model.dtype=float32",
                     f"--cache.cache_dir={tmp_path / 'cache'}", "--logging.write_sample=false",
                     *tiny_args(recipe, data=False)])  # fmt: skip
        loras.append(load_file(out / "pytorch_lora_weights.safetensors"))
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) > 0
    for other in loras[1:]:
        assert all(torch.equal(loras[0][k], other[k]) for k in loras[0])


def test_auto_training_logs_the_edit_metrics(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    data, held = _edited_pairs(tmp_path / "d"), _edited_pairs(tmp_path / "held", n=2)
    out = tmp_path / "out"
    flux_kontext_lora.main(["train", f"--data.dataset_path={data}", f"--logging.output_dir={out}",
                            "--train.max_train_steps=2", "--train.loss_mask=auto", "--validation.enabled=true",
                            f"--validation.dataset_path={held}", "--validation.validation_steps=2",
                            "--logging.report_to=jsonl", "--logging.write_sample=false", TINY[0]])  # fmt: skip
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/psnr_changed" in r]
    assert [r["step"] for r in val] == [0, 2]
    assert all(0 < r["val/psnr_changed"] < 100 and 0 < r["val/psnr_unchanged"] < 100 for r in val)
    assert "edit PSNR" in capsys.readouterr().out and (out / "validation" / "step-000002.png").exists()


def test_the_edit_metrics_compare_the_right_regions() -> None:
    from qflux.data.masks import edit_psnr

    control, target = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    target[:, :4] = 1.0
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1.0
    changed, kept = edit_psnr(target.clone(), control, target, mask)  # a perfect edit
    assert changed == 100 and kept == 100
    changed, kept = edit_psnr(control.clone(), control, target, mask)  # no edit at all: preserved, not changed
    assert changed == 0 and kept == 100
    assert torch.isnan(edit_psnr(control, control, control, torch.zeros(1, 8, 8))[0])
