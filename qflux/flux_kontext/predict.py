"""Editing an image with FLUX.1 Kontext (optionally through a LoRA), step for step as
``FluxKontextPipeline`` with ``_auto_resize=False`` and ``max_area = height·width``.

    latents ~ N(0, I) from torch.Generator('cpu').manual_seed(seed)
    σ_i = linspace(1, 1/N, N) shifted by μ(seq_len);  x ← x + (σ_{i+1} − σ_i)·v̂(x, σ_i)
    true CFG (with a negative prompt): v̂ = v̂_neg + s·(v̂_pos − v̂_neg)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from qflux.data import MULTIPLE, image_to_tensor
from qflux.flow import resolution_mu
from qflux.flux_kontext.conditioning import encode_prompt_with, vae_decode, vae_encode
from qflux.flux_kontext.loaders import FluxKontextModels
from qflux.flux_kontext.step import predict_velocity


def default_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of ``image`` floored to multiples of 16: the default output size."""
    return max(MULTIPLE, image.width // MULTIPLE * MULTIPLE), max(MULTIPLE, image.height // MULTIPLE * MULTIPLE)


@torch.no_grad()
def predict(
    models: FluxKontextModels,
    image: Image.Image,
    prompt: str,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    seed: int = 0,
    negative_prompt: str | None = None,
    true_cfg_scale: float = 1.0,
    lora: Mapping[str, torch.Tensor] | None = None,
    max_sequence_length: int = 512,
) -> np.ndarray:
    """Edit ``image`` as instructed by ``prompt``.

    Args:
        models: transformer, vae, encoders, tokenizers and scheduler.
        image: the control image (RGB); resized to its own size floored to multiples of 16.
        height, width: output size (multiples of 16 after flooring); default the control's size.
        lora: LoRA tensors to substitute into the transformer; None uses the module as it is.
            Components may sit on different devices; tensors move to where each one runs.

    Returns:
        The edited image, [height, width, 3] float32 in [0, 1].
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.image_processor import VaeImageProcessor

    cw, ch = default_size(image)
    width = (width or cw) // MULTIPLE * MULTIPLE
    height = (height or ch) // MULTIPLE * MULTIPLE
    transformer, params = models.transformer, dict(lora or {})
    dtype, device, tdtype = models.text_encoder_2.dtype, transformer.device, transformer.dtype
    pos = encode_prompt_with(models, [prompt], max_sequence_length)
    neg = None
    if negative_prompt is not None and true_cfg_scale > 1:
        neg = encode_prompt_with(models, [negative_prompt], max_sequence_length)
    control = vae_encode(models.vae, image_to_tensor(image, (cw, ch)).to(dtype))
    c = models.vae.config.latent_channels
    shape = (1, c, 2 * (height // MULTIPLE), 2 * (width // MULTIPLE))
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(shape, generator=generator, dtype=dtype).to(device)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(models.scheduler.config)
    sc = scheduler.config
    seq_len = (shape[2] // 2) * (shape[3] // 2)
    mu = resolution_mu(seq_len, sc.base_image_seq_len, sc.max_image_seq_len, sc.base_shift, sc.max_shift)
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    scheduler.set_begin_index(0)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, dtype=torch.float32)
    for t in scheduler.timesteps:
        sigma = t.expand(1).to(device=device, dtype=dtype) / 1000
        v = predict_velocity(
            transformer, params, latents, control, sigma, pos.pooled, pos.tokens, guidance, dtype=tdtype
        )
        if neg is not None:
            v_neg = predict_velocity(
                transformer, params, latents, control, sigma, neg.pooled, neg.tokens, guidance, dtype=tdtype
            )
            v = v_neg + true_cfg_scale * (v - v_neg)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    decoded = vae_decode(models.vae, latents)
    out: np.ndarray = VaeImageProcessor(vae_scale_factor=MULTIPLE).postprocess(decoded, output_type="np")[0]
    return out


def to_pil(image: np.ndarray) -> Image.Image:
    """[H, W, 3] float in [0, 1] → 8-bit PIL image (rounded as diffusers' ``numpy_to_pil``)."""
    return Image.fromarray((image * 255).round().astype("uint8"))
