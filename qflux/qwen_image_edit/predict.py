"""Editing an image with Qwen-Image-Edit (optionally through a LoRA), step for step as
``QwenImageEditPipeline`` with its defaults.

The control image is resized to about 1024² pixels at its own aspect ratio (the pipeline's
``calculate_dimensions``, multiples of 32): that one image is both the VAE condition and the
vision-language input. True CFG (a negative prompt and ``true_cfg_scale`` > 1) rescales the
combined prediction to the norm of the conditional one:

    v = v̂_neg + s·(v̂_pos − v̂_neg);   v ← v · ‖v̂_pos‖ / ‖v‖      (norms over each token's channels)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from qflux.latents import pack_latents, unpack_latents
from qflux.lora import call_with_lora
from qflux.qwen_image_edit.conditioning import encode_prompt, vae_decode, vae_encode, vae_scale_factor
from qflux.qwen_image_edit.loaders import QwenImageEditModels
from qflux.sampling import euler_scheduler, initial_noise

CONDITION_AREA = 1024 * 1024
"""Qwen-Image-Edit: the pixel area the control image is resized to (VAE and vision input alike)."""
PLUS_VL_AREA = 384 * 384
"""Qwen-Image-Edit-Plus: the area of each control image the vision-language encoder sees."""
PLUS_VAE_AREA = 1024 * 1024
"""Qwen-Image-Edit-Plus: the area of each control image the VAE encodes (and of the output)."""


def condition_size(image: Image.Image, area: int = CONDITION_AREA, variant: str = "edit") -> tuple[int, int]:
    """(width, height) the pipeline resizes ``image`` to: about ``area`` pixels at its aspect ratio,
    multiples of 32.

    Looked up in the pipeline module at call time, so whatever diffusers (or a test) defines there
    is what both implementations use.
    """
    if variant == "edit":
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

        w, h, _ = edit.calculate_dimensions(area, image.width / image.height)
    else:
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

        w, h = plus.calculate_dimensions(area, image.width / image.height)
    return int(w), int(h)


def control_inputs(
    images: Sequence[Image.Image], variant: str, processor: Any
) -> tuple[list[Image.Image], list[torch.Tensor], list[tuple[int, int]], tuple[int, int]]:
    """The pipeline's preparation of the control image(s).

    Returns:
        (vision-language images, VAE pixel tensors [1, 3, H_i, W_i] in [-1, 1], their (W_i, H_i),
        the default output (width, height)).
    """
    if variant == "edit":
        (image,) = images
        cw, ch = condition_size(image)
        resized = processor.resize(image, ch, cw)
        return [resized], [processor.preprocess(resized, ch, cw)], [(cw, ch)], (cw, ch)
    vl, pixels, sizes = [], [], []
    for image in images:
        cw, ch = condition_size(image, PLUS_VL_AREA, variant)
        vw, vh = condition_size(image, PLUS_VAE_AREA, variant)
        vl.append(processor.resize(image, ch, cw))
        pixels.append(processor.preprocess(image, vh, vw))
        sizes.append((vw, vh))
    last = images[-1] if images else None
    out = condition_size(last, PLUS_VAE_AREA, variant) if last is not None else (1024, 1024)
    return vl, pixels, sizes, out


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
    out = call_with_lora(transformer, params, inputs)[0]
    return out[:, :n]


@torch.inference_mode()
def predict(
    models: QwenImageEditModels,
    image: Image.Image | Sequence[Image.Image],
    prompt: str,
    *,
    variant: str = "edit",
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    seed: int = 0,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 4.0,
    lora: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """Edit as ``prompt`` says; the pipeline's defaults (true CFG only with a negative prompt).

    Args:
        image: Edit: one control image. Edit-Plus (``variant='edit_plus'``): up to 3 (or none).

    Returns:
        [height, width, 3] float32 in [0, 1]; the size defaults to the (last) control image's
        ~1024² size.
    """
    from diffusers.image_processor import VaeImageProcessor

    images = [image] if isinstance(image, Image.Image) else list(image)
    transformer, params = models.transformer, dict(lora or {})
    factor = vae_scale_factor(models.vae)
    multiple = factor * 2
    processor = VaeImageProcessor(vae_scale_factor=multiple)
    vl_images, pixels, sizes, (ow, oh) = control_inputs(images, variant, processor)
    height = (height or oh) // multiple * multiple
    width = (width or ow) // multiple * multiple
    encode = partial(encode_prompt, models.text_encoder, models.processor, images=[vl_images], variant=variant)
    embeds, mask = encode([prompt])
    negative = negative_prompt if true_cfg_scale > 1 else None
    if negative is not None:
        neg_embeds, neg_mask = encode([negative])
    device = transformer.device
    control = [pack_latents(vae_encode(models.vae, x).to(device, embeds.dtype)) for x in pixels]
    c = transformer.config.in_channels // 4
    h, w = 2 * (height // multiple), 2 * (width // multiple)
    latents = pack_latents(initial_noise((1, c, h, w), seed, embeds.dtype, device))
    n = latents.shape[1]
    img_shapes = [[(1, h // 2, w // 2), *[(1, sh // factor // 2, sw // factor // 2) for sw, sh in sizes]]]
    scheduler = euler_scheduler(models.scheduler.config, num_inference_steps, n, device)
    for t in scheduler.timesteps:
        tokens = torch.cat([latents, *control], dim=1)
        sigma = t.expand(1).to(latents.dtype) / 1000
        v = transformer_velocity(transformer, params, tokens, n, sigma, embeds, _mask(mask), img_shapes)
        if negative is not None:
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
