"""Qwen-Image-Edit conditioning as pure functions: the vision-language prompt embedding and the
normalised VAE latents, step for step as ``QwenImageEditPipeline`` computes them.

    text  = TEMPLATE.format(prompt)         (system prompt, then the control image's vision tokens)
    h     = Qwen2.5-VL(text, image).hidden_states[-1][mask][DROP_INDEX:]          [S, D]
    z     = (VAE.encode(x).mode() − μ) / σ     per latent channel (``latents_mean`` / ``latents_std``)

Every sample is encoded with its own control image: a batch never shares the first sample's image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from qflux.weights.dtypes import compute_dtype

_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT_TEMPLATE = _SYSTEM + VISION + "{}<|im_end|>\n<|im_start|>assistant\n"
"""Qwen-Image-Edit: one control image, its vision tokens before the instruction."""
PLUS_TEMPLATE = _SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
"""Qwen-Image-Edit-Plus: ``Picture i: <vision tokens>`` for each control image, then the instruction."""


def templated(prompt: str, n_images: int, variant: str) -> str:
    """The text the encoder sees for ``prompt`` with ``n_images`` control images."""
    if variant == "edit":
        return PROMPT_TEMPLATE.format(prompt)
    pictures = "".join(f"Picture {i + 1}: {VISION}" for i in range(n_images))
    return PLUS_TEMPLATE.format(pictures + prompt)


DROP_INDEX = 64
"""Tokens of the templated prompt dropped from the embedding (the system part), as the pipeline."""


@torch.no_grad()
def encode_prompt(
    text_encoder: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image | Sequence[Image.Image]],
    *,
    variant: str = "edit",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed each prompt with its own control image(s), then pad to a common length.

    Args:
        prompts: one instruction per sample.
        images: per sample, its control image (Edit) or list of 0-3 images (Edit-Plus), already
            resized as the pipeline does.
        variant: "edit" or "edit_plus" (the template, :func:`templated`).

    Returns:
        (embeds [B, S, D] in the encoder's dtype, mask [B, S] long: 1 for real tokens).
    """
    device = text_encoder.device
    rows = []
    for prompt, image in zip(prompts, images, strict=True):
        pictures = [image] if isinstance(image, Image.Image) else list(image)
        text = templated(prompt, len(pictures), variant)
        inputs = processor(text=[text], images=pictures or None, padding=True, return_tensors="pt")
        inputs = inputs.to(device)
        out = text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]
        rows.append(hidden[DROP_INDEX:])
    length = max(r.shape[0] for r in rows)
    embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
    mask = torch.stack(
        [
            torch.cat([torch.ones(r.shape[0], dtype=torch.long), torch.zeros(length - r.shape[0], dtype=torch.long)])
            for r in rows
        ]
    ).to(device)
    return embeds.to(compute_dtype(text_encoder)), mask


def _stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ, σ) of the latent channels, shaped [1, C, 1, 1, 1] like ``like``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def vae_encode(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] → normalised latents [B, C, H/f, W/f] (the distribution's mode)."""
    x = pixels.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)  # one video frame
    z = vae.encode(x).latent_dist.mode()
    mean, std = _stats(vae, z)
    return ((z - mean) / std)[:, :, 0]


@torch.no_grad()
def vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, C, h, w] → images [B, 3, h·f, w·f] in about [-1, 1]."""
    z = latents.to(device=vae.device, dtype=vae.dtype).unsqueeze(2)
    mean, std = _stats(vae, z)
    return vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
