"""Editing with FLUX.2 from zero or more reference images (optionally through a LoRA), step for step as
``Flux2KleinPipeline`` ([klein]) and ``Flux2Pipeline`` ([dev]).

    references: each checked (≥ 64 px), shrunk to ≤ 1024² pixels, floored to multiples of 16 and
        centre-cropped to that size; encoded, patchified and normalised; reference k at T = 10·(k+1)
    latents ~ N(0, I) [1, 4C, h, w] from torch.Generator('cpu').manual_seed(seed)
    σ_i = linspace(1, 1/N, N) shifted by the empirical μ(h·w, N);  x ← x + (σ_{i+1} − σ_i)·v̂(x, σ_i)
    [klein]: CFG (guidance_scale > 1 on a model that is not step-distilled): v̂ = v̂_∅ + s·(v̂ − v̂_∅), ∅ the
        empty prompt
    [dev]: the guidance-distilled transformer reads guidance_scale as an input, g; no CFG
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from qflux.data.controls import ControlRule, ControlSizes
from qflux.data.images import to_image
from qflux.diffusion.latents import latent_size, size_multiple, unpack_latents
from qflux.diffusion.sampling import cfg_batch, euler_denoise, guided, initial_noise
from qflux.models.flux2.conditioning import PromptEmbeds, encode_prompt, vae_decode, vae_encode
from qflux.models.flux2.loaders import Flux2Models
from qflux.models.flux2.loss import guidance_values, token_inputs, velocity
from qflux.models.flux2.text import TextEncoder
from qflux.weights.dtypes import compute_dtype

MAX_REFERENCE_AREA = 1024 * 1024
"""References above this many pixels are shrunk to it first (the pipeline's limit)."""


def image_processor(multiple: int) -> Any:
    """The pipeline's ``Flux2ImageProcessor`` for images sized in multiples of ``multiple``."""
    # deferred: diffusers is a heavy import
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    return Flux2ImageProcessor(vae_scale_factor=multiple)


def reference_size(size: tuple[int, int], area: int | None, multiple: int) -> tuple[int, int]:
    """(w, h) the pipeline gives a reference of ``size``: shrunk to ``area`` pixels when above it (sides
    truncated, ``Flux2ImageProcessor._resize_to_target_area``), then floored to ``multiple``."""
    w, h = size
    if area is not None and w * h > area:
        scale = math.sqrt(area / (w * h))
        w, h = int(w * scale), int(h * scale)
    return w // multiple * multiple, h // multiple * multiple


CONTROLS = ControlRule("own", MAX_REFERENCE_AREA, reference_size)
"""The pipeline's rule for references: each at its own size, at most 1024² px (what ``data.control_size: model``
means; ``own`` shrinks a reference to the area, never enlarges it)."""


def reference_tensor(
    image: Image.Image, multiple: int, sizing: ControlSizes | None = None, output: tuple[int, int] | None = None
) -> torch.Tensor:
    """One reference as the pipeline prepares it: [1, 3, h, w] in [−1, 1], h and w multiples of ``multiple``.

    Args:
        sizing: :mod:`qflux.data.controls`' rule: "own" (the pipeline's, the default: its own size, shrunk to
            1024² px or the cap when smaller), "keep" (its own size, shrunk to the cap) or "target" (``output``'s
            (w, h), centre-cropped to it).

    Raises:
        ValueError: an image under 64 px a side (the pipeline's check, its message).
    """
    proc = image_processor(multiple)
    proc.check_image_input(image)
    sizing = sizing or ControlSizes(CONTROLS.sizing, CONTROLS.max_pixels, CONTROLS.own)
    if sizing.sizing == "target" and output is not None:
        w, h = output
    else:
        cap = sizing.max_pixels
        if cap is not None and image.width * image.height > cap:
            image = proc._resize_to_target_area(image, cap)
        w, h = reference_size(image.size, None, multiple)
    return proc.preprocess(image, height=h, width=w, resize_mode="crop")


PIPELINE_STEPS = 50
"""The FLUX.2 pipelines' default number of denoising steps (and predict's)."""


def training_mu(image_seq_len: int) -> float:
    """The μ training's ``resolution_shift`` sampler shifts by: the pipeline's at its default steps (training has
    no step count of its own)."""
    return empirical_mu(image_seq_len, PIPELINE_STEPS)


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift μ for ``image_seq_len`` latent tokens and ``num_steps`` steps (the pipeline's own)."""
    # deferred: diffusers is a heavy import
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return float(compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps))


@torch.inference_mode()
def predict(
    models: Flux2Models,
    encoder: TextEncoder,
    images: Sequence[Image.Image],
    prompt: str,
    *,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = PIPELINE_STEPS,
    guidance_scale: float = 4.0,
    distilled: bool = False,
    seed: int = 0,
    lora: Mapping[str, torch.Tensor] | None = None,
    max_sequence_length: int = 512,
    sizing: ControlSizes | None = None,
) -> np.ndarray:
    """Edit (or, with no images, generate) as ``prompt`` says.

    Args:
        encoder: the variant's text encoder.
        images: the reference images (RGB), 0 or more.
        height, width: output size, floored to multiples of the VAE factor × 2; default the first
            reference's prepared size (1024² without references, as the pipeline).
        guidance_scale: a guidance-distilled transformer's ([dev]'s) guidance input; else the CFG scale
            against the empty prompt, used when > 1 and the model is not step-distilled (``distilled``: the
            pipeline config's ``is_distilled``).
        lora: LoRA tensors to substitute into the transformer; None uses the module as it is.
        sizing: training's reference sizing (:func:`reference_tensor`); None: the pipeline's.

    Returns:
        The image, [height, width, 3] float32 in [0, 1].
    """
    multiple = size_multiple(models.vae.config)
    dtype = compute_dtype(models.text_encoder)
    first = reference_tensor(images[0], multiple, sizing) if images else None
    default = (first.shape[-2], first.shape[-1]) if first is not None else (1024, 1024)
    out = latent_size(height or default[0], width or default[1], multiple)
    size = (out[1] * multiple // 2, out[0] * multiple // 2)  # (w, h) in pixels
    refs = [reference_tensor(im, multiple, sizing, size) for im in images]
    encode = encoder, models.text_encoder, models.tokenizer
    pos = encode_prompt(*encode, [prompt], max_sequence_length)
    cfg = guidance_scale > 1 and not distilled and not models.transformer.config.guidance_embeds
    neg = encode_prompt(*encode, [""], max_sequence_length) if cfg else None
    latents = denoise(
        models.transformer,
        models.scheduler.config,
        tuple(vae_encode(models.vae, r.to(dtype)) for r in refs),
        pos,
        neg,
        latent_hw=out,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        lora=lora,
        noise_dtype=pos.tokens.dtype,
    )
    return to_image(vae_decode(models.vae, latents))


@torch.inference_mode()
def denoise(transformer: Any, scheduler_config: Any, references: tuple[torch.Tensor, ...],
            prompt: PromptEmbeds, negative: PromptEmbeds | None, *, latent_hw: tuple[int, int],
            num_inference_steps: int, guidance_scale: float, seed: int = 0,
            lora: Mapping[str, torch.Tensor] | None = None,
            noise_dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """The Flux2 transformer's velocity on [x ; references] tokens (CFG against the empty prompt as one
    batch of 2; or, guidance-distilled, with ``guidance_scale`` as its input) stepped by
    :func:`qflux.diffusion.sampling.euler_denoise` on FLUX.2's empirical shift:
    the pipeline's sampling from encoded inputs (shared by predict and validation).

    Args:
        references: normalised latents [1, C, h_k, w_k] of each reference.
        prompt, negative: the prompt's embedding and, for CFG, the empty prompt's.
        guidance_scale: the CFG scale (with ``negative``), or the guidance-distilled transformer's input.
        latent_hw: (h, w) of the output latents (even; the image is the VAE factor times larger).

    Returns:
        Final normalised latents [1, C, h, w] on the transformer's device.
    """
    params = dict(lora or {})
    device, tdtype = transformer.device, compute_dtype(transformer)
    h, w = latent_hw
    # the pipeline draws its noise on the patchified grid [1, 4C, h/2, w/2]: the same numbers, unpatchified
    patchified = initial_noise((1, transformer.config.in_channels, h // 2, w // 2), seed, noise_dtype, device)
    noise = unpack_latents(patchified.flatten(2).transpose(1, 2).contiguous(), h, w)
    seq = (h // 2) * (w // 2)
    text, text_ids = cfg_batch(
        (prompt.tokens, prompt.ids), None if negative is None else (negative.tokens, negative.ids), device
    )
    b = text.shape[0]
    refs = tuple(r.to(device).expand(b, -1, -1, -1) for r in references)
    guidance = guidance_values(transformer, guidance_scale, text)

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = t.expand(b).to(device=device, dtype=noise_dtype) / 1000
        tokens, ids = token_inputs(x.expand(b, -1, -1, -1), refs)
        out = velocity(transformer, params, tokens, seq, sigma, text, text_ids, ids, dtype=tdtype, guidance=guidance)
        out = unpack_latents(out, h, w)
        return (out if negative is None else guided(out[:1], out[1:], guidance_scale)).to(x.dtype)

    mu = empirical_mu(seq, num_inference_steps)
    return euler_denoise(v, noise, scheduler_config, num_inference_steps, seq, mu=mu)
