"""qflux's FLUX.2 [klein] predict against ``Flux2KleinPipeline`` on the same tiny model, images and seed:
one and two references, guidance off and on, without and with our LoRA (which the pipeline loads with
``load_lora_weights``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from qflux.config import LoraConfig
from qflux.flux2_klein.loaders import load_flux2_klein
from qflux.flux2_klein.predict import predict
from qflux.lora import inject_lora, save_lora
from qflux.tiny_flux2 import build_flux2_klein

STEPS = 3


def _image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture(scope="module")
def klein(tmp_path_factory: pytest.TempPathFactory):
    """A tiny klein (seed 2), our models, a LoRA on them (saved for the pipeline), and the pipeline."""
    path = build_flux2_klein(tmp_path_factory.mktemp("klein"), seed=2)
    models = load_flux2_klein(path, torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"))
    lora = inject_lora(models.transformer, cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    lora = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in lora.items()}
    out = tmp_path_factory.mktemp("klein-lora")
    save_lora(out, models.transformer, lora, dtype=torch.float32, pipeline_cls=Flux2KleinPipeline)
    pipe = Flux2KleinPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return path, models, lora, out, pipe


def _refs(n: int) -> list[Image.Image]:
    return [_image(96, 72, 0), _image(80, 112, 1)][:n]


def _pipe_image(pipe, n: int, guidance: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    return pipe(image=_refs(n), prompt="make it red", num_inference_steps=STEPS, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(3), output_type="np",
                max_sequence_length=32).images[0]  # fmt: skip


@pytest.mark.parametrize(("n", "guidance"), [(1, 1.0), (1, 4.0), (2, 1.0), (2, 4.0)])
def test_predict_equals_the_pipeline(klein, n: int, guidance: float) -> None:
    _, models, _, _, pipe = klein
    ours = predict(models, _refs(n), "make it red", num_inference_steps=STEPS, guidance_scale=guidance, seed=3,
                   max_sequence_length=32)  # fmt: skip
    ref = _pipe_image(pipe, n, guidance)
    assert ours.shape == ref.shape == (64, 96, 3)  # the first reference's size, floored to 16
    assert _mad(ours, ref) <= 1 / 255


@pytest.mark.parametrize(("n", "guidance"), [(1, 4.0), (2, 1.0)])
def test_our_lora_in_the_pipeline_equals_predict_and_moves_the_image(klein, n: int, guidance: float) -> None:
    _, models, lora, out, pipe = klein
    kw = {"num_inference_steps": STEPS, "guidance_scale": guidance, "seed": 3, "max_sequence_length": 32}
    ours = predict(models, _refs(n), "make it red", lora=lora, **kw)
    base = predict(models, _refs(n), "make it red", **kw)
    assert _mad(ours, base) > 5 / 255
    pipe.load_lora_weights(str(out))
    try:
        assert _mad(_pipe_image(pipe, n, guidance), ours) <= 1 / 255
    finally:
        pipe.unload_lora_weights()
