"""The tiny offline Qwen-Image-Edit model: deterministic, in the diffusers layout, and runnable by
diffusers' own Edit and Edit-Plus pipelines without torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.models.qwen_image_edit.processor import load_qwen_processor
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.weights.tiny_parts import CHAT_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def small_dims(request: pytest.FixtureRequest):
    """The pipelines resize inputs to about 1024² (slow on CPU): shrink that to 64² for these tests."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    originals = (edit.calculate_dimensions, plus.calculate_dimensions)
    edit.calculate_dimensions = lambda area, ratio: originals[0](64 * 64, ratio)
    plus.calculate_dimensions = lambda area, ratio: originals[1](min(area, 64 * 64), ratio)
    yield
    edit.calculate_dimensions, plus.calculate_dimensions = originals


def test_build_is_deterministic(tmp_path: Path) -> None:
    a, b = build_qwen_image_edit(tmp_path / "a", seed=0), build_qwen_image_edit(tmp_path / "b", seed=0)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("model_index.json") in files and Path("processor/processor_config.json") in files
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = build_qwen_image_edit(tmp_path / "c", seed=1)
    assert (c / "transformer/diffusion_pytorch_model.safetensors").read_bytes() != (
        a / "transformer/diffusion_pytorch_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("variant", ["edit", "edit_plus"])
def test_diffusers_pipeline_loads_and_runs_it(variant: str, tmp_path: Path, small_dims) -> None:
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    path = build_qwen_image_edit(tmp_path / "m", seed=0, variant=variant)
    cls = QwenImageEditPipeline if variant == "edit" else QwenImageEditPlusPipeline
    pipe = cls.from_pretrained(path, processor=load_qwen_processor(path / "processor"))
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer
    cfg = pipe.text_encoder.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert all(t in tok.get_vocab() for t in CHAT_SPECIAL_TOKENS)
    assert pipe.vae.config.latents_std != [1.0] * pipe.vae.config.z_dim  # exercises the normalisation
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    out = pipe(
        image=image,
        prompt="make it blue",
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        max_sequence_length=32,
    ).images[0]
    assert out.ndim == 3 and out.shape[-1] == 3 and np.isfinite(out).all()
