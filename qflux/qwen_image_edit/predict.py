"""Editing an image with Qwen-Image-Edit (optionally through a LoRA), step for step as
``QwenImageEditPipeline`` with its defaults.

The control image is resized to about 1024² pixels at its own aspect ratio (the pipeline's
``calculate_dimensions``, multiples of 32): that one image is both the VAE condition and the
vision-language input. True CFG (a negative prompt and ``true_cfg_scale`` > 1) rescales the
combined prediction to the norm of the conditional one:

    v = v̂_neg + s·(v̂_pos − v̂_neg);   v ← v · ‖v̂_pos‖ / ‖v‖      (norms over each token's channels)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.func import functional_call

from qflux.latents import pack_latents, unpack_latents
from qflux.qwen_image_edit.conditioning import encode_prompt, vae_decode, vae_encode, vae_scale_factor
from qflux.qwen_image_edit.loaders import QwenImageEditModels
from qflux.sampling import euler_scheduler, initial_noise

CONDITION_AREA = 1024 * 1024
"""Pixel area the pipeline resizes the control image to (the VAE and vision-language input)."""


def condition_size(image: Image.Image, area: int = CONDITION_AREA) -> tuple[int, int]:
    """(width, height) the pipeline resizes ``image`` to: about ``area`` pixels at its aspect ratio.

    Looked up in the pipeline module at call time, so whatever diffusers (or a test) defines there
    is what both implementations use.
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

    w, h, _ = edit.calculate_dimensions(area, image.width / image.height)
    return int(w), int(h)


def transformer_velocity(
    transformer: Any,
    params: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    n: int,
    sigmas: torch.Tensor,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    img_shapes: list[list[tuple[int, int, int]]],
) -> torch.Tensor:
    """One QwenImage transformer call on [target ; control] tokens; the first ``n`` tokens' output.

    Args:
        params: LoRA tensors substituted into the module, ``{}`` for the module as it is.
        tokens: packed [B, N + Nc, 4C]; sigmas: [B]; embeds: [B, S, D]; mask: [B, S] or None.
        img_shapes: per sample, (frames, h/2, w/2) of the target then of each control image.
    """
    dtype = transformer.dtype
    inputs = {
        "hidden_states": tokens.to(dtype),
        "timestep": sigmas.to(dtype),
        "guidance": None,
        "encoder_hidden_states_mask": mask,
        "encoder_hidden_states": embeds.to(dtype),
        "img_shapes": img_shapes,
        "return_dict": False,
    }
    if params:
        out = functional_call(transformer, dict(params), (), inputs, strict=False)[0]
    else:
        out = transformer(**inputs)[0]
    return out[:, :n]


@torch.inference_mode()
def predict(
    models: QwenImageEditModels,
    image: Image.Image,
    prompt: str,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 4.0,
    lora: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Edit ``image`` as ``prompt`` says; the pipeline's defaults (true CFG only with a negative prompt).

    Returns:
        [height, width, 3] float32 in [0, 1]; the size defaults to the resized control image's.
    """
    from diffusers.image_processor import VaeImageProcessor

    transformer, params = models.transformer, dict(lora or {})
    factor = vae_scale_factor(models.vae)
    processor = VaeImageProcessor(vae_scale_factor=factor * 2)
    cw, ch = condition_size(image)
    multiple = factor * 2
    height = (height or ch) // multiple * multiple
    width = (width or cw) // multiple * multiple
    resized = processor.resize(image, ch, cw)
    embeds, mask = encode_prompt(models.text_encoder, models.processor, [prompt], [resized])
    negative = negative_prompt if true_cfg_scale > 1 else None
    use_cfg = negative is not None
    if negative is not None:
        neg_embeds, neg_mask = encode_prompt(models.text_encoder, models.processor, [negative], [resized])
    device = transformer.device
    control = pack_latents(vae_encode(models.vae, processor.preprocess(resized, ch, cw)).to(device, embeds.dtype))
    c = transformer.config.in_channels // 4
    h, w = 2 * (height // multiple), 2 * (width // multiple)
    latents = pack_latents(initial_noise((1, c, h, w), seed, embeds.dtype, device))
    n = latents.shape[1]
    img_shapes = [[(1, h // 2, w // 2), (1, ch // factor // 2, cw // factor // 2)]]
    scheduler = euler_scheduler(models.scheduler.config, num_inference_steps, n, device)
    for t in scheduler.timesteps:
        tokens = torch.cat([latents, control], dim=1)
        sigma = t.expand(1).to(latents.dtype) / 1000
        v = transformer_velocity(transformer, params, tokens, n, sigma, embeds, _mask(mask), img_shapes)
        if use_cfg:
            v_neg = transformer_velocity(transformer, params, tokens, n, sigma, neg_embeds, _mask(neg_mask), img_shapes)
            combined = v_neg + true_cfg_scale * (v - v_neg)
            v = combined * (v.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    decoded = vae_decode(models.vae, unpack_latents(latents, h, w))
    out: np.ndarray = processor.postprocess(decoded, output_type="np")[0]
    return out


def _mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The pipeline passes no mask when every token is real."""
    return None if bool(mask.all()) else mask
