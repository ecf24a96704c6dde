"""Loading Qwen-Image-Edit(-Plus) from a diffusers-layout folder: one table of its components.

The same contract as FLUX.1 Kontext's (:mod:`qflux.loading`): frozen, eval mode, on the requested
device, one-sentence errors naming the folder. The processor is rebuilt without torchvision
(:mod:`qflux.qwen_image_edit.processor`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.loading import Table, load_part, load_parts
from qflux.qwen_image_edit.processor import load_qwen_processor

PIPELINE = "Qwen-Image-Edit"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
ENCODERS = ("vae", "text_encoder")
"""Components used only to encode images and prompts (not loaded when training from the cache)."""


@functools.cache
def table() -> Table:
    """{component: how it loads}: the QwenImage transformer, its autoencoder (images [B, 3, 1, H, W]
    ↔ latents [B, 16, 1, H/8, W/8], normalised with ``latents_mean`` / ``latents_std``), the
    Qwen2.5-VL encoder (vision tower included: hidden states of the prompt with its control
    image(s) [B, S, 3584]), the Qwen2 tokenizer, the Qwen2-VL processor and the scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return {
        "transformer": QwenImageTransformer2DModel,
        "vae": AutoencoderKLQwenImage,
        "text_encoder": Qwen2_5_VLForConditionalGeneration,
        "tokenizer": AutoTokenizer,
        "processor": load_qwen_processor,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }


def load_qwen_image_edit_part(
    model_path: str | Path,
    name: str,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    *,
    quantize: str = "none",
) -> Any:
    """One component of a Qwen-Image-Edit folder (:func:`table` names them)."""
    return load_part(table(), model_path, name, weight_dtype, device, pipeline=PIPELINE, quantize=quantize)


@attrs.frozen(eq=False)
class QwenImageEditModels:
    """What one Qwen-Image-Edit job needs; ``None`` for a component it does not load."""

    transformer: Any
    """``QwenImageTransformer2DModel``; in training it carries an injected (zeroed) LoRA adapter."""
    vae: Any
    """``AutoencoderKLQwenImage``, or None when latents come from the cache."""
    text_encoder: Any
    """``Qwen2_5_VLForConditionalGeneration``, or None when embeddings come from the cache."""
    tokenizer: Any
    """``Qwen2Tokenizer`` for the text-only template."""
    processor: Any
    """``Qwen2VLProcessor``: the prompt template with its control image(s)."""
    scheduler: Any
    """``FlowMatchEulerDiscreteScheduler`` whose config predict and training read."""


def load_qwen_image_edit(
    model_path: str | Path,
    weight_dtype: torch.dtype,
    *,
    include: Sequence[str] = ("transformer", *ENCODERS),
    devices: Mapping[str, str | torch.device] | None = None,
    quantize: Mapping[str, str] | None = None,
) -> QwenImageEditModels:
    """The components a job needs from a Qwen-Image-Edit(-Plus) folder (the weights in ``include``;
    the rest stay ``None``), plus the tokenizer, the processor and the scheduler.

    Args:
        devices: {component: device} (default cpu).
        quantize: {component: none / fp8 / nf4 / fp4} for the transformer and the text encoder.
    """
    parts = load_parts(
        table(), model_path, weight_dtype, pipeline=PIPELINE, include=include, devices=devices, quantize=quantize
    )
    return QwenImageEditModels(**parts)
