"""Models and data of shapes the built-in ones do not have: a VAE of three levels (×4), a
transformer of width 48 and head dim 24, odd image sizes of mixed aspect. Every size comes from the
model's own config: the data, training, validation, the sample and predict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from qflux.config.parse import load_config
from qflux.data.pairs import PairRule
from qflux.data.synthetic import make_synthetic_pairs
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.models.qwen_image_edit.config import QwenImageEditConfig
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.train.run import dataset_samples
from recipes import flux_kontext_lora, qwen_image_edit_lora

SIZES = ((61, 46), (88, 40))  # (w, h); exact sizes in multiples of 8: 56×40 and 88×40
FLUX_ODD = {
    "vae": {"block_out_channels": (8, 16, 16)},
    "transformer": {"attention_head_dim": 24, "axes_dims_rope": (4, 10, 10)},
}
QWEN_4X = {"vae": {"dim_mult": (1, 2, 4), "temperal_downsample": (False, True)}}


@pytest.mark.parametrize("name", ["flux_kontext", "qwen_image_edit"])
def test_training_validation_and_predict_follow_the_model_config(name: str, tmp_path: Path, monkeypatch) -> None:
    data = make_synthetic_pairs(tmp_path / "data", 4, seed=0, sizes=SIZES)
    held = make_synthetic_pairs(tmp_path / "held", 2, seed=1, sizes=SIZES)
    overrides: dict[str, Any] = {
        "data.dataset_path": str(data),
        "train.max_train_steps": 2,
        "logging.output_dir": str(tmp_path / "out"),
        "logging.report_to": "none",
        "validation.enabled": True,
        "validation.dataset_path": str(held),
        "validation.num_inference_steps": 1,
    }
    if name == "flux_kontext":
        model, recipe, cls = (
            build_flux_kontext(tmp_path / "m", overrides=FLUX_ODD),
            flux_kontext_lora,
            FluxKontextConfig,
        )
        overrides |= {"model.quantize": "fp4", "model.max_sequence_length": 16}  # nothing 48 wide fits 4 bits
    else:
        model, recipe, cls = (
            build_qwen_image_edit(tmp_path / "m", overrides=QWEN_4X),
            qwen_image_edit_lora,
            QwenImageEditConfig,
        )
    overrides["model.pretrained_model_name_or_path"] = str(model)
    cfg = load_config(cls, None, overrides)
    # buckets of the largest target's area (88·40 px) in multiples of 8 (40 is not one of 16)
    assert {s.target_size for s in dataset_samples(cfg, model, PairRule())} == {(64, 48), (80, 40)}
    exact = load_config(cls, None, {**overrides, "data.buckets": "exact"})
    assert {s.target_size for s in dataset_samples(exact, model, PairRule())} == {(56, 40), (88, 40)}
    result = recipe.train(cfg)
    assert len(result.losses) == 2 and np.isfinite(result.losses).all()
    out = tmp_path / "out"
    assert (out / "sample.png").is_file() and list((out / "validation").glob("*.png"))
    if name == "qwen_image_edit":
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

        original = edit.calculate_dimensions
        monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(56 * 40, ratio))
    image = data / "control_images" / "sample_000.png"
    extra = ["--model.max_sequence_length=16"] if name == "flux_kontext" else []
    lora = out / "pytorch_lora_weights.safetensors"
    args = [f"--image={image}", "--prompt=invert", f"--out={tmp_path / 'p.png'}", "--num_inference_steps=1"]
    recipe.main(["predict", *args, f"--model.pretrained_model_name_or_path={model}", f"--lora={lora}", *extra])
    w, h = Image.open(tmp_path / "p.png").size
    assert w % 8 == 0 and h % 8 == 0 and (w, h) != (48, 32)
