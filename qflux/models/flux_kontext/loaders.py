"""Loading FLUX.1 Kontext from a diffusers-layout folder: one table of its components.

Each weight component loads frozen, in eval mode, on its device (:func:`qflux.weights.loading.load_part`);
loading one never loads the others, so training from a cache skips the text encoders entirely.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.weights.loading import ModelFiles, Table, load_parts

PIPELINE = "FLUX.1 Kontext"
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
ENCODERS = ("vae", "text_encoder", "text_encoder_2")
"""Components used only to encode images and prompts (not loaded when training from the cache)."""


@functools.cache
def table() -> Table:
    """{component: how it loads}: the Flux transformer with its guidance embedding, the autoencoder
    (images [B, 3, H, W] ↔ latents [B, 16, H/8, W/8]), CLIP (pooled prompt [B, 768]), T5 (prompt
    tokens [B, S, 4096]), their tokenizers and the flow-matching scheduler."""
    # deferred: diffusers is a heavy import
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    # deferred: transformers is a heavy import
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    return {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "tokenizer": AutoTokenizer,
        "tokenizer_2": AutoTokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }


@attrs.frozen(eq=False)
class FluxKontextModels:
    """The frozen components one job needs; ``None`` where a job does not need one."""

    transformer: Any
    """``FluxTransformer2DModel``; in training it carries an injected (zeroed) LoRA adapter."""
    vae: Any
    """``AutoencoderKL``, or None when the job reads latents from the cache."""
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any


def load_flux_kontext(
    model_path: str | Path,
    weight_dtype: torch.dtype,
    *,
    include: Sequence[str] | None = None,
    devices: Mapping[str, str | torch.device] | None = None,
    quantize: Mapping[str, str] | None = None,
) -> FluxKontextModels:
    """The components a job needs (:func:`qflux.weights.loading.load_parts`: the weights in ``include``,
    default all, the rest ``None``; the small components always), on ``devices``, quantized as
    ``quantize`` says."""
    return FluxKontextModels(
        **load_parts(FLUX_KONTEXT, model_path, weight_dtype, include=include, devices=devices, quantize=quantize)
    )


FLUX_KONTEXT = ModelFiles(PIPELINE, table)
"""The FLUX.1 Kontext folder layout (:func:`qflux.weights.loading.load_part` loads one component of it)."""
