"""Qwen-Image-Edit LoRA: ``python -m recipes.qwen_image_edit_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random Qwen-Image-Edit model and the
synthetic colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors`` for diffusers' ``QwenImageEditPipeline`` and
``..._comfyui.safetensors``), ``config.yaml``, ``loss.png`` and ``sample.png``.

``model.variant: edit_plus`` trains Qwen-Image-Edit-2509, whose samples have 0 to 3 control images
(``control_images/NAME.png``, ``NAME_control_1.png``, ``NAME_control_2.png``). Each sample's prompt
is embedded with its own control image(s), resized as the pipeline resizes them. The loop is
:mod:`recipes.lora_loop`, shared with FLUX.1 Kontext; the maths lives in ``qflux``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from qflux.batching import Conditioning
from qflux.cache import CacheReport
from qflux.config import QwenImageEditConfig
from qflux.config_parse import load_config
from qflux.data import PairDataset, load_rgb
from qflux.errors import QfluxError
from qflux.loading import torch_dtype
from qflux.qwen_image_edit import cache as qcache
from qflux.qwen_image_edit.batch import (
    QwenPairDataset,
    cached_conditioning,
    collate_qwen_pairs,
    encode_conditioning,
    to_batch,
)
from qflux.qwen_image_edit.conditioning import vae_decode
from qflux.qwen_image_edit.loaders import COMPONENTS, PIPELINE, QwenImageEditModels, load_qwen_image_edit
from qflux.qwen_image_edit.predict import denoise
from qflux.qwen_image_edit.predict import predict as qwen_predict
from qflux.qwen_image_edit.step import make_loss_fn
from qflux.train_state import LossFn
from recipes import lora_loop
from recipes.lora_loop import CachePath, DataPath, Family, RunResult

ENCODERS = ("vae", "text_encoder")
MAX_CONTROLS = {"edit": (1, 1), "edit_plus": (0, 3)}
"""(fewest, most) control images per sample of each variant."""


def _pipeline_cls() -> Any:
    from diffusers import QwenImageEditPipeline

    return QwenImageEditPipeline


def _encoded(cfg: QwenImageEditConfig, models: QwenImageEditModels) -> DataPath:
    variant = cfg.model.variant
    return DataPath(
        lambda samples: QwenPairDataset(PairDataset(samples), variant),
        collate_qwen_pairs,
        partial(encode_conditioning, models, variant=variant),
        None,  # each sample carries its own empty-instruction embedding (it sees the images)
    )


def _cached(cfg: QwenImageEditConfig, path: Path) -> CachePath:
    spec = qcache.cache_spec(path, cfg.model.dtype, cfg.model.variant)
    root = Path(cfg.cache.cache_dir)
    return CachePath(
        entries=partial(qcache.sample_entries, spec, root),
        verify=partial(qcache.verify_cache, spec, root),
        fill=lambda models, samples, progress: qcache.fill_cache(spec, models, samples, root, progress=progress),
        dataset=qcache.cached_dataset,
        collate=qcache.collate_cached,
        conditioning=cached_conditioning,
        empty=lambda: None,
    )


def _loss_fn(cfg: QwenImageEditConfig, transformer: Any) -> LossFn:
    return make_loss_fn(transformer, weighting_scheme=cfg.train.weighting_scheme)


def _preview(
    cfg: QwenImageEditConfig, models: QwenImageEditModels, cond: Conditioning, lora: Any, steps: int
) -> torch.Tensor:
    """Denoise one sample's conditioning at its target size (no true CFG)."""
    return denoise(
        models.transformer,
        models.scheduler.config,
        cond.controls,
        (cond.text["embeds"], cond.text["mask"]),
        None,
        latent_hw=(cond.latents.shape[-2], cond.latents.shape[-1]),
        num_inference_steps=steps,
        seed=cfg.seed,
        lora=lora,
        noise_dtype=torch_dtype(cfg.model.dtype),
    )


FAMILY = Family(
    name="qwen_image_edit_lora",
    pipeline=PIPELINE,
    components=COMPONENTS,
    pipeline_cls=_pipeline_cls,
    encoders=ENCODERS,
    load=load_qwen_image_edit,
    controls=lambda cfg: MAX_CONTROLS[cfg.model.variant],
    encoded=_encoded,
    cached=_cached,
    loss_fn=_loss_fn,
    to_batch=to_batch,
    preview=_preview,
    decode=vae_decode,
    naming="qwen",
)


def run(cfg: QwenImageEditConfig) -> RunResult:
    """Train a LoRA as configured and write the outputs (:func:`recipes.lora_loop.run`)."""
    return lora_loop.run(FAMILY, cfg)


def fill(cfg: QwenImageEditConfig) -> CacheReport:
    """Compute the cache entries the configured dataset needs; returns the computed/reused counts."""
    return lora_loop.fill(FAMILY, cfg)


def _images(image: str | list[str] | tuple[str, ...] | None, variant: str) -> list[Image.Image]:
    """The control image(s) of ``--image``: one path, or (Edit-Plus) a comma-separated list or none."""
    if image is None or image == "":
        paths: list[str] = []
    elif isinstance(image, str):
        paths = [p.strip() for p in image.split(",") if p.strip()]
    else:
        paths = [str(p) for p in image]
    lo, hi = MAX_CONTROLS[variant]
    if not lo <= len(paths) <= hi:
        want = "exactly one image" if variant == "edit" else "0 to 3 images, comma-separated"
        raise QfluxError(f"model.variant '{variant}' takes {want} in --image; got {len(paths)}")
    for p in paths:
        if not Path(p).is_file():
            raise QfluxError(f"input image '{p}' does not exist; pass --image=PATH")
    return [load_rgb(Path(p)) for p in paths]


def predict(
    prompt: str,
    image: str | list[str] | None = None,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 4.0,
    config: str | None = None,
    **overrides: Any,
) -> None:
    """Edit: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    The pipeline's defaults: 50 steps, true CFG (scale 4) only with ``--negative_prompt``, the
    output at the (last) control image's ~1024² size. Edit-Plus takes ``--image=A.png,B.png``.

    Args:
        prompt: the edit instruction.
        image: the image to edit; Edit-Plus (model.variant: edit_plus) takes 0 to 3, comma-separated.
        out: where the edited image is written (folders are made).
        lora: a LoRA file: diffusers, ComfyUI or kohya format (the files qflux writes, at any width).
        seed: seed of the initial noise.
        num_inference_steps: denoising steps.
        height: output height in pixels (default: the last control image's ~1024² size).
        width: output width in pixels (default: the last control image's ~1024² size).
        negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this prompt.
        true_cfg_scale: the true CFG scale (used with negative_prompt).
    """
    cfg = load_config(QwenImageEditConfig, config, overrides)
    images = _images(image, cfg.model.variant)
    models = lora_loop.predict_models(FAMILY, cfg, lora)
    result = qwen_predict(
        models,
        images,
        prompt,
        variant=cfg.model.variant,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        seed=seed,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
    )
    lora_loop.save_edit(result, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    lora_loop.main(FAMILY, QwenImageEditConfig, lora_loop.commands(FAMILY, QwenImageEditConfig, predict), argv)


if __name__ == "__main__":
    main()
