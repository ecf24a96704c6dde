"""FLUX.1 Kontext LoRA: ``python -m recipes.flux_kontext_lora [train|cache|predict] [--config=F] [--a.b=c ...]``.

With no arguments it trains on the built-in default (a tiny random model and a synthetic
colour-inversion dataset) and writes, under ``logging.output_dir``: the LoRA
(``pytorch_lora_weights.safetensors``, diffusers format, and ``..._comfyui.safetensors``),
``config.yaml``, ``loss.png`` and ``sample.png`` (control | target | before | after).

``cache`` fills the embedding cache; ``train`` with ``cache.use_cache=true`` then loads only the
transformer. This module says what is FLUX-specific (:data:`FAMILY`); the loop is
:mod:`recipes.lora_loop`, shared with Qwen-Image-Edit, and the maths lives in ``qflux``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from qflux.batching import Conditioning
from qflux.config import FluxKontextConfig
from qflux.config_parse import load_config
from qflux.data import PairDataset, collate_pairs, load_rgb
from qflux.errors import QfluxError
from qflux.flux_kontext import cache as kcache
from qflux.flux_kontext.batch import cached_conditioning, encode_conditioning, text_tensors, to_batch
from qflux.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_decode
from qflux.flux_kontext.loaders import COMPONENTS, PIPELINE, FluxKontextModels, load_flux_kontext, torch_dtype
from qflux.flux_kontext.predict import denoise
from qflux.flux_kontext.predict import predict as kontext_predict
from qflux.flux_kontext.step import make_loss_fn
from qflux.train_state import LossFn
from recipes import lora_loop
from recipes.lora_loop import CachePath, DataPath, Family, RunResult

ENCODERS = ("vae", "text_encoder", "text_encoder_2")


def _pipeline_cls() -> Any:
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline


def _encoded(cfg: FluxKontextConfig, models: FluxKontextModels) -> DataPath:
    seq = cfg.model.max_sequence_length
    empty = text_tensors(encode_prompt_with(models, [""], seq))
    to_cond = partial(encode_conditioning, models, max_sequence_length=seq)
    return DataPath(PairDataset, collate_pairs, to_cond, empty)


def _cached(cfg: FluxKontextConfig, path: Path) -> CachePath:
    spec = kcache.cache_spec(path, cfg.model.dtype, cfg.model.max_sequence_length)
    root = Path(cfg.cache.cache_dir)
    return CachePath(
        entries=partial(kcache.sample_entries, spec, root),
        verify=partial(kcache.verify_cache, spec, root),
        fill=lambda models, samples, progress: kcache.fill_cache(spec, models, samples, root, progress=progress),
        dataset=kcache.cached_dataset,
        collate=kcache.collate_cached,
        conditioning=cached_conditioning,
        empty=lambda: text_tensors(kcache.read_empty_prompt(spec, root)),
    )


def _loss_fn(cfg: FluxKontextConfig, transformer: Any) -> LossFn:
    return make_loss_fn(
        transformer, guidance_scale=cfg.train.guidance_scale, weighting_scheme=cfg.train.weighting_scheme
    )


def _preview(
    cfg: FluxKontextConfig, models: FluxKontextModels, cond: Conditioning, lora: Any, steps: int
) -> torch.Tensor:
    """Denoise one sample's conditioning at its target size (guidance as in training, no true CFG)."""
    return denoise(
        models.transformer,
        models.scheduler.config,
        cond.controls[0] if cond.controls else None,
        PromptEmbeds(pooled=cond.text["pooled"], tokens=cond.text["tokens"]),
        None,
        latent_hw=(cond.latents.shape[-2], cond.latents.shape[-1]),
        num_inference_steps=steps,
        guidance_scale=cfg.train.guidance_scale,
        seed=cfg.seed,
        lora=lora,
        noise_dtype=torch_dtype(cfg.model.dtype),
    )


FAMILY = Family(
    name="flux_kontext_lora",
    pipeline=PIPELINE,
    components=COMPONENTS,
    pipeline_cls=_pipeline_cls,
    encoders=ENCODERS,
    load=load_flux_kontext,
    controls=lambda cfg: (1, 1),
    encoded=_encoded,
    cached=_cached,
    loss_fn=_loss_fn,
    to_batch=to_batch,
    preview=_preview,
    decode=vae_decode,
    naming="flux",
)


def run(cfg: FluxKontextConfig) -> RunResult:
    """Train a LoRA as configured and write the outputs (:func:`recipes.lora_loop.run`)."""
    return lora_loop.run(FAMILY, cfg)


def fill(cfg: FluxKontextConfig) -> kcache.CacheReport:
    """Compute the cache entries the configured dataset needs; returns the computed/reused counts."""
    return lora_loop.fill(FAMILY, cfg)


def predict(
    image: str,
    prompt: str,
    out: str = "edited.png",
    lora: str | None = None,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 1.0,
    config: str | None = None,
    **overrides: Any,
) -> None:
    """Edit one image: ``predict --image=IN.png --prompt="..." --out=OUT.png [--lora=FILE] [--model.*=...]``.

    Args:
        image: the image to edit (PNG, JPEG or WebP).
        prompt: the edit instruction.
        out: where the edited image is written (folders are made).
        lora: a LoRA file: diffusers, ComfyUI or kohya format (the files qflux writes, at any width).
        seed: seed of the initial noise.
        num_inference_steps: denoising steps.
        guidance_scale: the guidance value fed to the guidance-distilled transformer.
        height: output height in pixels (default: the image's, floored to the model's multiple).
        width: output width in pixels (default: the image's, floored to the model's multiple).
        negative_prompt: with true_cfg_scale > 1, true classifier-free guidance against this prompt.
        true_cfg_scale: the true CFG scale (used with negative_prompt).
    """
    cfg = load_config(FluxKontextConfig, config, overrides)
    src = Path(image)
    if not src.is_file():
        raise QfluxError(f"input image '{src}' does not exist; pass --image=PATH")
    models = lora_loop.predict_models(FAMILY, cfg, lora)
    result = kontext_predict(
        models,
        load_rgb(src),
        prompt,
        height=height,
        width=width,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=cfg.model.max_sequence_length,
    )
    lora_loop.save_edit(result, out)


def main(argv: list[str] | None = None) -> None:
    """Entry point: no arguments trains the built-in default; errors print one message and exit 2."""
    lora_loop.main(FAMILY, FluxKontextConfig, lora_loop.commands(FAMILY, FluxKontextConfig, predict), argv)


if __name__ == "__main__":
    main()
