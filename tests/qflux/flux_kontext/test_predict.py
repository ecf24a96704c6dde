"""Our predict reproduces FluxKontextPipeline (within 1/255 mean absolute difference), with and
without a LoRA, and the LoRA we save loads in diffusers and gives the same images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image

from qflux.config.schema import LoraConfig
from qflux.lora.adapter import inject_lora, load_lora_file, save_lora
from qflux.models.flux_kontext.loaders import load_flux_kontext
from qflux.models.flux_kontext.predict import predict

STEPS = 4


def _image(w: int = 70, h: int = 52) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pipe_out(pipe, image: Image.Image, prompt: str, h: int, w: int, seed: int = 0, **kw) -> np.ndarray:
    return pipe(
        image=image,
        prompt=prompt,
        height=h,
        width=w,
        max_area=h * w,
        _auto_resize=False,
        guidance_scale=2.5,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=64,
        output_type="np",
        **kw,
    ).images[0]


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize(("h", "w"), [(None, None), (32, 64)])
def test_predict_equals_pipeline_without_lora(flux_pipe, flux_models, h: int | None, w: int | None) -> None:
    image = _image()
    ours = predict(
        flux_models,
        image,
        "invert the colors",
        guidance_scale=2.5,
        height=h,
        width=w,
        num_inference_steps=STEPS,
        max_sequence_length=64,
    )
    eh, ew = (h or 48), (w or 64)  # 52×70 floors to 48×64
    assert ours.shape == (eh, ew, 3)
    ref = _pipe_out(flux_pipe, image, "invert the colors", eh, ew)
    assert _mad(ours, ref) <= 1 / 255


def test_true_cfg_equals_pipeline(flux_pipe, flux_models) -> None:
    image = _image()
    kw = {"negative_prompt": "blurry", "true_cfg_scale": 3.0}
    ours = predict(
        flux_models,
        image,
        "make it red",
        guidance_scale=2.5,
        num_inference_steps=STEPS,
        max_sequence_length=64,
        seed=3,
        **kw,
    )
    ref = _pipe_out(flux_pipe, image, "make it red", 48, 64, seed=3, **kw)
    assert _mad(ours, ref) <= 1 / 255


def test_lora_predict_equals_diffusers_loaded_lora(tiny_flux_dir: Path, tmp_path: Path) -> None:
    models = load_flux_kontext(tiny_flux_dir, torch.float32)
    lora = inject_lora(models.transformer, LoraConfig(r=4, lora_alpha=8), seed=0)
    g = torch.Generator().manual_seed(1)
    trained = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    path = save_lora(tmp_path, models.transformer, trained, dtype=torch.float32, pipeline_cls=FluxKontextPipeline)
    assert path.name == "pytorch_lora_weights.safetensors"

    image = _image()
    ours = predict(
        models,
        image,
        "invert the colors",
        guidance_scale=2.5,
        num_inference_steps=STEPS,
        lora=trained,
        max_sequence_length=64,
    )
    base = predict(
        models, image, "invert the colors", guidance_scale=2.5, num_inference_steps=STEPS, max_sequence_length=64
    )
    assert _mad(ours, base) > 5 / 255  # the LoRA really changes the image

    pipe = FluxKontextPipeline.from_pretrained(tiny_flux_dir, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    ref = _pipe_out(pipe, image, "invert the colors", 48, 64)
    assert _mad(ours, ref) <= 1 / 255

    # and the predict CLI path: the file loaded into a fresh transformer
    fresh = load_flux_kontext(tiny_flux_dir, torch.float32)
    load_lora_file(fresh.transformer, path, naming="flux", pipeline_cls=FluxKontextPipeline)
    from_file = predict(
        fresh, image, "invert the colors", guidance_scale=2.5, num_inference_steps=STEPS, max_sequence_length=64
    )
    assert _mad(from_file, ref) <= 1 / 255


def test_saved_lora_has_diffusers_keys_and_metadata(tiny_flux_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    models = load_flux_kontext(tiny_flux_dir, torch.float32)
    lora = inject_lora(models.transformer, LoraConfig(r=2, lora_alpha=2), seed=0)
    path = save_lora(tmp_path, models.transformer, lora, dtype=torch.bfloat16, pipeline_cls=FluxKontextPipeline)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert len(keys) == len(lora)
    assert '"transformer.r": 2' in meta["lora_adapter_metadata"]


@pytest.mark.parametrize(("h", "w"), [(None, None), (24, 40)])
def test_a_4x_vae_sizes_images_from_its_own_config(tmp_path: Path, h: int | None, w: int | None) -> None:
    """A Kontext model whose VAE has three levels (×4): sizes are multiples of 8, not 16, and predict
    still equals the pipeline (which derives the factor from the VAE config)."""
    from qflux.models.flux_kontext.tiny import build_flux_kontext

    folder = build_flux_kontext(tmp_path / "vae4", seed=0, overrides={"vae": {"block_out_channels": (8, 16, 16)}})
    pipe = FluxKontextPipeline.from_pretrained(folder, dtype=torch.float32)
    assert pipe.vae_scale_factor == 4
    image = _image(w=61, h=46)
    models = load_flux_kontext(folder, torch.float32)
    ours = predict(models, image, "invert the colors", guidance_scale=2.5, height=h, width=w,
                   num_inference_steps=STEPS, max_sequence_length=64)  # fmt: skip
    eh, ew = (h or 40), (w or 56)  # 46×61 floors to 40×56 in multiples of 8 (32×48 in multiples of 16)
    assert ours.shape == (eh, ew, 3)
    assert _mad(ours, _pipe_out(pipe, image, "invert the colors", eh, ew)) <= 1 / 255
