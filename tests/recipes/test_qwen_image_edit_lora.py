"""The Qwen-Image-Edit recipe, run in-process on the tiny model: pinned first losses for Edit and
for Edit-Plus with two control images and with none, cached training equal to uncached training,
conditioning that follows each sample's control image, the LoRA files, and the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file

from qflux.config.parse import load_config
from qflux.data.pairs import scan_pairs
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from recipes.qwen_image_edit_lora import main
from recipes.qwen_image_edit_lora import train as run

# First losses of the seeded fp32 runs below, pinned from reference runs of this recipe.
PINNED_EDIT = [1.3436286449432373, 1.2440567016601562, 1.409367561340332, 1.4250426292419434]
PINNED_EDIT_PLUS = [
    1.239221215248108,
    1.325324296951294,
    1.435549020767212,
    1.5019800662994385,
    1.5639796257019043,
    1.463620901107788,
]


@pytest.fixture(scope="module")
def edit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("qwen-edit"), seed=0)


@pytest.fixture(scope="module")
def plus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("qwen-edit-plus"), seed=0, variant="edit_plus")


def plus_pairs(root: Path) -> Path:
    """Six Edit-Plus samples: 0-1 with two control images (the second mirrored), 2-3 with none,
    4-5 with one. Every sample has the same instruction."""
    make_synthetic_pairs(root, 6, seed=3)
    controls = root / "control_images"
    for name in ("sample_000", "sample_001"):
        ImageOps.mirror(Image.open(controls / f"{name}.png")).save(controls / f"{name}_control_1.png")
    for name in ("sample_002", "sample_003"):
        (controls / f"{name}.png").unlink()
    return root


def _cfg(model: Path, out: Path, **more: object) -> QwenImageEditConfig:
    overrides = {
        "model.pretrained_model_name_or_path": str(model),
        "model.dtype": "float32",
        "train.max_train_steps": 4,
        "logging.output_dir": str(out),
        "logging.write_sample": False,
        "logging.report_to": "none",
        "cache.cache_dir": str(out.parent / "cache"),
        "seed": 0,
        **more,
    }
    return load_config(QwenImageEditConfig, None, overrides)


def test_edit_first_losses_are_pinned_and_the_lora_loads(edit_dir: Path, tmp_path: Path) -> None:
    from diffusers import QwenImageEditPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor

    more = {"logging.write_sample": True, "validation.num_inference_steps": 2}
    result = run(_cfg(edit_dir, tmp_path / "out", **more))
    assert len(result.losses) == 4 == result.state.step
    assert result.losses == pytest.approx(PINNED_EDIT, rel=1e-4)
    out = tmp_path / "out"
    for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors", "sample.png"):
        assert (out / name).is_file(), name
    pipe = QwenImageEditPipeline.from_pretrained(edit_dir, processor=load_qwen_processor(edit_dir / "processor"))
    pipe.load_lora_weights(out)  # loads in diffusers as is


def test_edit_plus_with_two_controls_and_none(plus_dir: Path, tmp_path: Path) -> None:
    data = plus_pairs(tmp_path / "data")
    samples = scan_pairs(data, None, multiple=16, controls=(0, 3))
    assert [len(s.controls) for s in samples] == [2, 2, 0, 0, 1, 1]
    more = {"model.variant": "edit_plus", "data.dataset_path": str(data), "data.batch_size": 1,
            "data.shuffle": False, "train.max_train_steps": 6}  # fmt: skip
    result = run(_cfg(plus_dir, tmp_path / "out", **more))
    assert result.losses == pytest.approx(PINNED_EDIT_PLUS, rel=1e-4)
    assert all(np.isfinite(result.losses))
    # cached training reads the same conditioning: the same losses and LoRA, bit for bit
    cached = run(_cfg(plus_dir, tmp_path / "cached", **more, **{"cache.use_cache": True}))
    assert cached.losses == result.losses
    assert all(torch.equal(cached.state.lora[k], result.state.lora[k]) for k in result.state.lora)


def test_edit_plus_validates_on_a_folder_of_multi_control_samples(plus_dir: Path, tmp_path: Path) -> None:
    """A validation folder in Edit-Plus's layout is read with its rule: NAME_control_1 is a sample's second
    control image, not a sample of its own (which had no target and failed)."""
    data = plus_pairs(tmp_path / "data")
    more = {"model.variant": "edit_plus", "data.dataset_path": str(data), "train.max_train_steps": 2,
            "validation.enabled": True, "validation.dataset_path": str(data), "validation.validation_steps": 2,
            "validation.num_inference_steps": 1, "validation.num_validation_samples": 3}  # fmt: skip
    result = run(_cfg(plus_dir, tmp_path / "out", **more))
    assert len(result.losses) == 2
    assert sorted((tmp_path / "out" / "validation").glob("*.png"))


def test_edit_2511_trains_and_its_lora_loads_in_the_pipeline(tmp_path: Path) -> None:
    """The built-in 2511 model (zero_cond_t) trains with finite losses on Edit-Plus's data, the LoRA
    loads in QwenImageEditPlusPipeline and ``predict --lora`` reads it; a 2509 variant on it is refused."""
    from diffusers import QwenImageEditPlusPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor

    model = build_qwen_image_edit(tmp_path / "model", seed=4, variant="edit_2511")
    data = plus_pairs(tmp_path / "data")
    more = {"model.variant": "edit_2511", "data.dataset_path": str(data), "data.batch_size": 1,
            "train.max_train_steps": 3}  # fmt: skip
    result = run(_cfg(model, tmp_path / "out", **more))
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    pipe = QwenImageEditPlusPipeline.from_pretrained(model, processor=load_qwen_processor(model / "processor"))
    pipe.load_lora_weights(tmp_path / "out")
    with pytest.raises(SystemExit) as info:
        main(["train", f"--model.pretrained_model_name_or_path={model}", "--model.variant=edit_plus",
              f"--logging.output_dir={tmp_path / 'other'}", f"--data.dataset_path={data}"])  # fmt: skip
    assert info.value.code == 2


def test_comfyui_file_keeps_diffusers_names_and_the_update(plus_dir: Path, tmp_path: Path) -> None:
    from diffusers import QwenImageEditPlusPipeline

    data = plus_pairs(tmp_path / "data")
    more = {"model.variant": "edit_plus", "data.dataset_path": str(data), "train.max_train_steps": 2,
            "model.lora.r": 4, "model.lora.lora_alpha": 8}  # fmt: skip
    run(_cfg(plus_dir, tmp_path / "out", **more))
    ours = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    comfy = load_file(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors")
    module = "transformer_blocks.0.attn.to_q"
    assert f"diffusion_model.{module}.lora_down.weight" in comfy
    assert float(comfy[f"diffusion_model.{module}.alpha"]) == 8.0
    delta = 2.0 * ours[f"transformer.{module}.lora_B.weight"] @ ours[f"transformer.{module}.lora_A.weight"]
    up, down = comfy[f"diffusion_model.{module}.lora_up.weight"], comfy[f"diffusion_model.{module}.lora_down.weight"]
    torch.testing.assert_close((8.0 / 4) * up @ down, delta)
    # diffusers reads the ComfyUI file back to the same update
    sd = QwenImageEditPlusPipeline.lora_state_dict(str(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors"))
    a, b = sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"]
    torch.testing.assert_close(b @ a, delta)


def test_predict_cli(edit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(64 * 64, ratio))
    data = make_synthetic_pairs(tmp_path / "data", 1, seed=0)
    image = data / "control_images" / "sample_000.png"
    out = tmp_path / "edited.png"
    model = f"--model.pretrained_model_name_or_path={edit_dir}"
    main(["predict", f"--image={image}", "--prompt=invert", f"--out={out}", "--num_inference_steps=2", model])
    assert Image.open(out).size == (64, 64)
    with pytest.raises(SystemExit) as info:
        main(["predict", f"--image={image},{image}", "--prompt=x", model])
    assert info.value.code == 2
    assert "takes exactly one image" in capsys.readouterr().err


def test_dataset_errors_name_the_control_files(tmp_path: Path) -> None:
    from qflux.config.errors import QfluxError

    data = make_synthetic_pairs(tmp_path / "data", 2, seed=0)
    controls = data / "control_images"
    shutil.copy(controls / "sample_000.png", controls / "sample_000_control_2.png")  # no _control_1
    shutil.copy(controls / "sample_001.png", controls / "sample_001_control_3.png")  # a 4th image
    with pytest.raises(QfluxError) as info:
        scan_pairs(data, None, multiple=16, controls=(0, 3))
    message = str(info.value)
    assert "sample_000_control_1.<png|jpg|jpeg|webp>: missing" in message
    assert "sample_001_control_3.png: sample 'sample_001' has more than 3 control images" in message
    # Qwen-Image-Edit (one control image): a sample without one is refused
    (controls / "sample_000_control_2.png").unlink()
    (controls / "sample_001_control_3.png").unlink()
    (controls / "sample_001.png").unlink()
    with pytest.raises(QfluxError, match=r"sample_001\.<png\|jpg\|jpeg\|webp>: missing image"):
        scan_pairs(data, None, multiple=16)
