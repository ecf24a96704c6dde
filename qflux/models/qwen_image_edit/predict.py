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

from qflux.data.controls import ControlRule, ControlSizes
from qflux.data.images import crop, to_image
from qflux.diffusion.latents import latent_size, pack_latents, size_multiple, unpack_latents
from qflux.diffusion.sampling import euler_denoise, guided, initial_noise
from qflux.models.qwen_image_edit.conditioning import encode_prompt, vae_decode, vae_encode
from qflux.models.qwen_image_edit.loaders import QwenImageEditModels
from qflux.models.qwen_image_edit.loss import img_shapes, transformer_velocity
from qflux.weights.dtypes import compute_dtype

CONDITION_AREA = 1024 * 1024
"""Qwen-Image-Edit: the pixel area the control image is resized to (VAE and vision input alike)."""
PLUS_VL_AREA = 384 * 384
"""Qwen-Image-Edit-Plus: the area of each control image the vision-language encoder sees."""
PLUS_VAE_AREA = 1024 * 1024
"""Qwen-Image-Edit-Plus: the area of each control image the VAE encodes (and of the output)."""


def condition_size(image: Image.Image, area: int = CONDITION_AREA, variant: str = "edit") -> tuple[int, int]:
    """(width, height) the pipeline resizes ``image`` to: about ``area`` pixels at its aspect ratio,
    multiples of 32 (:func:`condition_dims`)."""
    return condition_dims(image.size, area, variant)


def condition_dims(size: tuple[int, int], area: int = CONDITION_AREA, variant: str = "edit") -> tuple[int, int]:
    """(width, height) the pipeline resizes an image of ``size`` = (w, h) to (:func:`condition_size`).

    Looked up in the pipeline module at call time, so whatever diffusers (or a test) defines there
    is what both implementations use.
    """
    if variant == "edit":
        # deferred: diffusers is a heavy import
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit

        w, h, _ = edit.calculate_dimensions(area, size[0] / size[1])
    else:
        # deferred: diffusers is a heavy import
        import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

        w, h = plus.calculate_dimensions(area, size[0] / size[1])
    return int(w), int(h)


def control_rule(variant: str) -> ControlRule:
    """The pipeline's rule for the VAE's control images: each at its own aspect, ~1024² px
    (:func:`condition_dims`), what ``data.control_size: model`` means."""
    area = CONDITION_AREA if variant == "edit" else PLUS_VAE_AREA
    return ControlRule("own", area, partial(_own, variant))


def control_sizes(variant: str) -> ControlSizes:
    """The pipeline's own sizing of the control images (:func:`control_rule` at its area)."""
    rule = control_rule(variant)
    return ControlSizes(rule.sizing, rule.max_pixels, rule.own)


def _own(variant: str, size: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """The pipeline's size for a control image of ``size`` at ``area``: ``calculate_dimensions`` (multiples of 32),
    floored to ``multiple`` as its image processor floors it."""
    w, h = condition_dims(size, area, variant)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


def vl_image(image: Image.Image, variant: str, processor: Any) -> Image.Image:
    """The control image as the pipeline hands it to the vision-language encoder: resized to
    ~1024² (Edit) or ~384² (Edit-Plus) at its aspect ratio (:func:`condition_size`).

    Args:
        processor: a diffusers ``VaeImageProcessor`` (its PIL resize; Lanczos by default).
    """
    area = CONDITION_AREA if variant == "edit" else PLUS_VL_AREA
    cw, ch = condition_size(image, area, variant)
    resized: Image.Image = processor.resize(image, ch, cw)
    return resized


def control_inputs(
    images: Sequence[Image.Image],
    variant: str,
    processor: Any,
    sizing: ControlSizes | None = None,
    output: tuple[int | None, int | None] = (None, None),
) -> tuple[list[Image.Image], list[torch.Tensor], list[tuple[int, int]], tuple[int, int]]:
    """The pipeline's preparation of the control image(s), each VAE input sized by ``sizing``.

    Args:
        sizing: :mod:`qflux.data.controls`' rule: "own" (the pipeline's, the default: ~1024² px at its aspect,
            or the cap's area when smaller: :func:`control_sizes`), "target" (the output's size, cropped to it) or
            "keep" (its own size floored, at most the cap).
        output: the requested output (width, height); None sides default to the (last) control's "own" size.

    Returns:
        (vision-language images, VAE pixel tensors [1, 3, H_i, W_i] in [-1, 1], their (W_i, H_i),
        the output (width, height)).
    """
    sizing = sizing or control_sizes(variant)
    multiple = processor.config.vae_scale_factor
    default = sizing if sizing.sizing == "own" else control_sizes(variant)  # the output: the pipeline's default
    last = default.own_size(images[-1].size, None, multiple) if images else (1024, 1024)
    out = (output[0] or last[0], output[1] or last[1])
    vl, pixels, sizes = [], [], []
    for image in images:
        (vw, vh), box = sizing.at_output(image.size, out, multiple)
        vl.append(vl_image(image, variant, processor))
        pixels.append(processor.preprocess(crop(image, box), vh, vw))
        sizes.append((vw, vh))
    return vl, pixels, sizes, out


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
    sizing: ControlSizes | None = None,
) -> np.ndarray:
    """Edit as ``prompt`` says; the pipeline's defaults (true CFG only with a negative prompt).

    Args:
        image: Edit: one control image. Edit-Plus (``variant='edit_plus'``): up to 3 (or none).
        sizing: training's control sizing (:func:`control_inputs`); None: the pipeline's.

    Returns:
        [height, width, 3] float32 in [0, 1]; the size defaults to the (last) control image's
        ~1024² size.
    """
    # deferred: diffusers is a heavy import
    from diffusers.image_processor import VaeImageProcessor

    images = [image] if isinstance(image, Image.Image) else list(image)
    multiple = size_multiple(models.vae.config)
    processor = VaeImageProcessor(vae_scale_factor=multiple)
    vl_images, pixels, _, (ow, oh) = control_inputs(images, variant, processor, sizing, (width, height))
    encode = partial(encode_prompt, models.text_encoder, models.processor, images=[vl_images], variant=variant)
    prompt_embeds = encode([prompt])
    negative = encode([negative_prompt]) if negative_prompt is not None and true_cfg_scale > 1 else None
    dtype = prompt_embeds[0].dtype  # the pipeline draws its noise in the prompt embedding's dtype
    latents = denoise(
        models.transformer,
        models.scheduler.config,
        [vae_encode(models.vae, x) for x in pixels],
        prompt_embeds,
        negative,
        latent_hw=latent_size(oh, ow, multiple),
        num_inference_steps=num_inference_steps,
        true_cfg_scale=true_cfg_scale,
        seed=seed,
        lora=lora,
        noise_dtype=dtype,
    )
    out: np.ndarray = to_image(vae_decode(models.vae, latents))
    return out


@torch.inference_mode()
def denoise(transformer: Any, scheduler_config: Any, controls: Sequence[torch.Tensor],
            prompt: tuple[torch.Tensor, torch.Tensor], negative: tuple[torch.Tensor, torch.Tensor] | None, *,
            latent_hw: tuple[int, int], num_inference_steps: int, true_cfg_scale: float = 4.0, seed: int = 0,
            lora: Mapping[str, torch.Tensor] | None = None,
            noise_dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The QwenImage transformer's velocity on [x ; controls] tokens (true CFG rescaled to the conditional
    norm) stepped by :func:`qflux.diffusion.sampling.euler_denoise`: the pipeline's sampling from encoded
    inputs (shared by predict and validation).

    Args:
        controls: latents of each control image [1, C, hc_k, wc_k] (any device); may be empty.
        prompt, negative: (embeddings [1, S, D], mask [1, S]) of the prompt and, for true CFG
            (``true_cfg_scale`` > 1), the negative prompt.
        latent_hw: (h, w) of the output latents (even).
        noise_dtype: dtype of the initial noise (the pipeline draws it in the text encoder's dtype).

    Returns:
        Final latents [1, C, h, w] on the transformer's device.
    """
    params, device, tdtype = dict(lora or {}), transformer.device, compute_dtype(transformer)
    embeds, mask = prompt
    neg = negative if true_cfg_scale > 1 else None
    packed = [pack_latents(c.to(device, noise_dtype)) for c in controls]
    h, w = latent_hw
    noise = pack_latents(initial_noise((1, transformer.config.in_channels // 4, h, w), seed, noise_dtype, device))
    n = noise.shape[1]
    shapes = img_shapes(1, (h, w), [(c.shape[-2], c.shape[-1]) for c in controls])
    mask_pos, mask_neg = _mask(mask), None if neg is None else _mask(neg[1])  # one host sync each, not per step

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([x, *packed], dim=1)  # [target ; controls], packed once
        sigma = t.expand(1).to(x.dtype) / 1000
        out = transformer_velocity(transformer, params, tokens, n, sigma, embeds, mask_pos, shapes, dtype=tdtype)
        if neg is None:
            return out
        v_neg = transformer_velocity(transformer, params, tokens, n, sigma, neg[0], mask_neg, shapes, dtype=tdtype)
        combined = guided(out, v_neg, true_cfg_scale)
        return combined * (out.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))  # v · ‖v̂_pos‖ / ‖v‖

    return unpack_latents(euler_denoise(v, noise, scheduler_config, num_inference_steps, n), h, w)


def _mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The pipeline passes no mask when every token is real."""
    return None if bool(mask.all()) else mask
