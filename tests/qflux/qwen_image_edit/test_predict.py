"""Our Qwen-Image-Edit predict reproduces ``QwenImageEditPipeline`` within 1/255 mean absolute pixel
difference, with true CFG off and on; one case runs the pipeline's default ~1024² resizing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qflux.models.qwen_image_edit.loaders import load_qwen_image_edit
from qflux.models.qwen_image_edit.predict import condition_size, predict
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_image_edit(tmp_path_factory.mktemp("tiny-qwen"), seed=0)


@pytest.fixture(scope="module")
def models(tiny_qwen: Path):
    return load_qwen_image_edit(tiny_qwen, torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_qwen: Path):
    from diffusers import QwenImageEditPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor

    p = QwenImageEditPipeline.from_pretrained(tiny_qwen, processor=load_qwen_processor(tiny_qwen / "processor"))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def small_area(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline (and so our predict) resizes to ~1024²: shrink that to ~96² on both sides."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda area, ratio: original(96 * 96, ratio))


def _image(w: int = 90, h: int = 70) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize("cfg", [None, "blurry, low quality"])
def test_predict_equals_pipeline(models, pipe, small_area, cfg: str | None) -> None:
    image = _image()
    kw = {"negative_prompt": cfg, "true_cfg_scale": 4.0}
    ours = predict(models, image, "make the sky pink", num_inference_steps=3, seed=2, **kw)
    ref = pipe(
        image=image,
        prompt="make the sky pink",
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(2),
        output_type="np",
        **kw,
    ).images[0]
    w, h = condition_size(image)
    assert ours.shape == ref.shape == (h, w, 3)
    assert _mad(ours, ref) <= 1 / 255


def test_predict_equals_pipeline_with_its_default_resizing(models, pipe) -> None:
    """No patching: the control image goes to about 1024² on both sides (2 steps: the fewest the
    scheduler's terminal shift allows; a million pixels are slow on CPU)."""
    image = _image(40, 30)
    ours = predict(models, image, "invert", num_inference_steps=2)
    gen = torch.Generator("cpu").manual_seed(0)
    ref = pipe(image=image, prompt="invert", num_inference_steps=2, generator=gen, output_type="np").images[0]
    assert ours.shape[:2] == (896, 1184)  # calculate_dimensions(1024², 4/3): multiples of 32
    assert np.isfinite(ours).all()
    assert _mad(ours, ref) <= 1 / 255


@pytest.fixture(scope="module", params=["edit_plus", "edit_2511"])
def plus_pipe(request, tmp_path_factory: pytest.TempPathFactory):
    """A tiny Edit-Plus (2509) or 2511 model (the same pipeline; 2511's transformer has zero_cond_t)."""
    from diffusers import QwenImageEditPlusPipeline

    from qflux.models.qwen_image_edit.processor import load_qwen_processor

    path = build_qwen_image_edit(tmp_path_factory.mktemp(f"tiny-qwen-{request.param}"), seed=0, variant=request.param)
    p = QwenImageEditPlusPipeline.from_pretrained(path, processor=load_qwen_processor(path / "processor"))
    p.set_progress_bar_config(disable=True)
    assert p.transformer.zero_cond_t == (request.param == "edit_2511")
    return path, p, request.param


@pytest.mark.parametrize(("n_images", "cfg"), [(1, None), (2, "blurry"), (3, None)])
def test_edit_plus_predict_equals_pipeline(plus_pipe, monkeypatch: pytest.MonkeyPatch, n_images: int, cfg) -> None:
    """Edit-Plus and 2511: each control image at ~384² for the vision-language encoder and ~1024² for
    the VAE (both areas shrunk 256× here on both sides), output at the last image's size."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    original = plus.calculate_dimensions
    monkeypatch.setattr(plus, "calculate_dimensions", lambda area, ratio: original(area / 256, ratio))
    path, pipe, variant = plus_pipe
    models = load_qwen_image_edit(path, torch.float32)
    images = [_image(90, 70), _image(50, 80), _image(64, 64)][:n_images]
    kw = {"negative_prompt": cfg, "true_cfg_scale": 4.0}
    ours = predict(models, images, "put them together", variant=variant, num_inference_steps=3, seed=1, **kw)
    gen = torch.Generator("cpu").manual_seed(1)
    ref = pipe(image=images, prompt="put them together", num_inference_steps=3, generator=gen, output_type="np", **kw)
    assert ours.shape == ref.images[0].shape
    assert _mad(ours, ref.images[0]) <= 1 / 255
