"""A LoRA qflux wrote is read back by qflux itself, for every model and variant and every format it
writes: ``predict --lora=FILE`` gives the image of the trained adapter, and
``model.lora.pretrained_weight=FILE`` starts a run from the same update ΔW = (α/r)·B·A."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.parse import load_config
from qflux.data.images import load_rgb
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from recipes import flux_kontext_lora, qwen_image_edit_lora

FILES = {"diffusers": "pytorch_lora_weights.safetensors", "comfyui": "pytorch_lora_weights_comfyui.safetensors"}
MODELS = ["flux_kontext", "qwen_edit", "qwen_edit_plus"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each model trained for 2 steps (α = 8r, every adapter random from the start) in both formats."""
    root = tmp_path_factory.mktemp("reuse")
    data = make_synthetic_pairs(root / "data", 2, seed=0)
    runs = {}
    for name in MODELS:
        if name == "flux_kontext":
            model, recipe, cls = build_flux_kontext(root / name, seed=0), flux_kontext_lora, FluxKontextConfig
            extra: dict[str, Any] = {"model.max_sequence_length": 16}
        else:
            variant = name.removeprefix("qwen_")
            model = build_qwen_image_edit(root / name, seed=0, variant=variant)
            recipe, cls, extra = qwen_image_edit_lora, QwenImageEditConfig, {"model.variant": variant}
        overrides = {
            "model.pretrained_model_name_or_path": str(model),
            "model.dtype": "float32",
            "model.lora.r": 4,
            "model.lora.lora_alpha": 32,
            "model.lora.init_lora_weights": False,
            "data.dataset_path": str(data),
            "optimizer.lr": 1e-2,
            "train.max_train_steps": 2,
            "logging.write_sample": False,
            "logging.report_to": "none",
            **extra,
        }
        out = root / f"out-{name}"
        result = recipe.train(load_config(cls, None, {**overrides, "logging.output_dir": str(out)}))
        runs[name] = {"recipe": recipe, "cls": cls, "overrides": overrides, "out": out, "result": result}
    runs["image"] = data / "control_images" / "sample_000.png"
    return runs


def _small_qwen_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Qwen pipelines resize inputs to about 1024²; 64² keeps the test fast."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio, f=original: f(64 * 64, ratio))


def _reference(run: dict[str, Any], image: Path) -> np.ndarray:
    """Our predict with the trained tensors substituted into the trained run's own modules."""
    result = run["result"]
    kw = {"num_inference_steps": 2, "seed": 0, "lora": result.state.lora}
    if run["recipe"] is flux_kontext_lora:
        from qflux.models.flux_kontext.predict import predict

        return predict(result.models, load_rgb(image), "invert", guidance_scale=2.5, max_sequence_length=16, **kw)
    from qflux.models.qwen_image_edit.predict import predict as qwen_predict

    return qwen_predict(result.models, [load_rgb(image)], "invert", variant=result.config.model.variant, **kw)


@pytest.mark.parametrize("fmt", sorted(FILES))
@pytest.mark.parametrize("name", MODELS)
def test_predict_reads_the_lora_qflux_wrote(
    trained: dict[str, Any], name: str, fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _small_qwen_inputs(monkeypatch)
    run = trained[name]
    model = f"--model.pretrained_model_name_or_path={run['overrides']['model.pretrained_model_name_or_path']}"
    args = [f"--image={trained['image']}", "--prompt=invert", "--num_inference_steps=2", "--model.dtype=float32", model]
    if name == "flux_kontext":
        args.append("--model.max_sequence_length=16")
    else:
        args.append(f"--model.variant={name.removeprefix('qwen_')}")
    run["recipe"].main(["predict", *args, f"--lora={run['out'] / FILES[fmt]}", f"--out={tmp_path / 'lora.png'}"])
    run["recipe"].main(["predict", *args, f"--out={tmp_path / 'base.png'}"])
    got = np.asarray(Image.open(tmp_path / "lora.png"), dtype=np.float64) / 255
    base = np.asarray(Image.open(tmp_path / "base.png"), dtype=np.float64) / 255
    want = _reference(run, trained["image"])
    assert np.abs(want - base).mean() > 2 / 255  # the LoRA really moves the image
    assert np.abs(got - want).mean() <= 1 / 255


@pytest.mark.parametrize("fmt", sorted(FILES))
@pytest.mark.parametrize("name", MODELS)
def test_pretrained_weight_reads_the_lora_qflux_wrote(
    trained: dict[str, Any], name: str, fmt: str, tmp_path: Path
) -> None:
    run = trained[name]
    overrides = {**run["overrides"], "logging.output_dir": str(tmp_path / "again"), "train.max_train_steps": 1,
                 "model.lora.pretrained_weight": str(run["out"] / FILES[fmt])}  # fmt: skip
    again = run["recipe"].train(load_config(run["cls"], None, overrides))
    trained_lora, start = run["result"].state.lora, again.initial_lora
    assert trained_lora.keys() == start.keys()
    for key in trained_lora:
        if ".lora_A." in key:
            b = key.replace(".lora_A.", ".lora_B.")
            torch.testing.assert_close(
                start[b].double() @ start[key].double(),
                trained_lora[b].double() @ trained_lora[key].double(),
                rtol=1e-5,
                atol=1e-6,
            )
