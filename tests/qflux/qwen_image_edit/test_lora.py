"""A LoRA on the Qwen-Image transformer, saved by qflux, loads with the pipeline's
``load_lora_weights`` and gives our predict's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.config.schema import LoraConfig
from qflux.lora.adapter import inject_lora, save_lora
from qflux.models.qwen_image_edit.loaders import load_qwen_image_edit
from qflux.models.qwen_image_edit.predict import predict
from qflux.models.qwen_image_edit.processor import load_qwen_processor
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit


def test_saved_lora_loads_in_the_pipeline_and_matches_predict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    from diffusers import QwenImageEditPipeline

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(96 * 96, ratio))
    path = build_qwen_image_edit(tmp_path / "model", seed=0)
    models = load_qwen_image_edit(path, torch.float32)
    lora = inject_lora(models.transformer, LoraConfig(r=4, lora_alpha=8), seed=0)
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    save_lora(tmp_path / "lora", models.transformer, trained, dtype=torch.float32, pipeline_cls=QwenImageEditPipeline)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    ours = predict(models, image, "make it pink", num_inference_steps=3, lora=trained)
    base = predict(models, image, "make it pink", num_inference_steps=3)
    assert float(np.abs(ours - base).mean()) > 2 / 255  # the LoRA changes the image

    pipe = QwenImageEditPipeline.from_pretrained(path, processor=load_qwen_processor(path / "processor"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "lora")
    gen = torch.Generator("cpu").manual_seed(0)
    ref = pipe(image=image, prompt="make it pink", num_inference_steps=3, generator=gen, output_type="np").images[0]
    assert float(np.abs(ours.astype(np.float64) - ref).mean()) <= 1 / 255
