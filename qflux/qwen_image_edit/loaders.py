"""Loading Qwen-Image-Edit components one at a time from a diffusers-layout folder.

The same contract as the FLUX.1 Kontext loaders (:mod:`qflux.loading`): frozen, eval mode, on the
requested device, one-sentence errors naming the folder. The processor is rebuilt without
torchvision (:mod:`qflux.qwen_image_edit.processor`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.errors import QfluxError
from qflux.loading import component_folder, load_component, load_included, load_scheduler, load_tokenizer
from qflux.model_dir import resolve_model_dir
from qflux.qwen_image_edit.processor import load_qwen_processor

PIPELINE = "Qwen-Image-Edit"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")


def load_qwen_image_edit_text_encoder(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The Qwen2.5-VL encoder (``text_encoder/``, vision tower included): hidden states of the
    prompt with its control image(s) [B, S, 3584]."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return load_component(
        Qwen2_5_VLForConditionalGeneration,
        model_path,
        "text_encoder",
        weight_dtype,
        device,
        pipeline=PIPELINE,
        quantize=quantize,
    )


def load_qwen_image_edit_vae(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The QwenImage autoencoder (``vae/``): images [B, 3, 1, H, W] ↔ latents [B, 16, 1, H/8, W/8],
    normalised with ``latents_mean`` / ``latents_std``."""
    from diffusers import AutoencoderKLQwenImage

    return load_component(
        AutoencoderKLQwenImage, model_path, "vae", weight_dtype, device, pipeline=PIPELINE, quantize=quantize
    )


def load_qwen_image_edit_transformer(
    model_path: str | Path,
    weight_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    quantize: str = "none",
) -> Any:
    """The QwenImage transformer (``transformer/``)."""
    from diffusers import QwenImageTransformer2DModel

    return load_component(
        QwenImageTransformer2DModel,
        model_path,
        "transformer",
        weight_dtype,
        device,
        pipeline=PIPELINE,
        quantize=quantize,
    )


def load_qwen_image_edit_tokenizer(model_path: str | Path) -> Any:
    """The Qwen2 tokenizer (``tokenizer/``)."""
    return load_tokenizer(model_path, "tokenizer", pipeline=PIPELINE)


def load_qwen_image_edit_processor(model_path: str | Path) -> Any:
    """The Qwen2-VL processor (``processor/``): tokenizer plus the vision patching settings."""
    path = component_folder(model_path, "processor", pipeline=PIPELINE)
    try:
        return load_qwen_processor(path / "processor")
    except (OSError, ValueError, KeyError) as e:
        raise QfluxError(f"could not load processor from '{path / 'processor'}': {e}") from None


def load_qwen_image_edit_scheduler(model_path: str | Path) -> Any:
    """The flow-matching Euler scheduler (``scheduler/``): Qwen-Image's exponential time shift."""
    return load_scheduler(model_path, pipeline=PIPELINE)


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
    device: str | torch.device = "cpu",
    *,
    devices: Mapping[str, str | torch.device] | None = None,
    include: Sequence[str] = ("transformer", "vae", "text_encoder"),
    quantize: Mapping[str, str] | None = None,
) -> QwenImageEditModels:
    """Load the components a job needs from a Qwen-Image-Edit(-Plus) folder; the rest stay ``None``.

    The tokenizer, processor and scheduler are always loaded (they are small).

    Args:
        quantize: {component: none / fp8 / nf4 / fp4} for the transformer and the text encoder.
    """
    path = resolve_model_dir(str(model_path), [*include, "tokenizer", "processor", "scheduler"], pipeline=PIPELINE)
    loaders = {
        "transformer": load_qwen_image_edit_transformer,
        "vae": load_qwen_image_edit_vae,
        "text_encoder": load_qwen_image_edit_text_encoder,
    }
    loaded = load_included(loaders, path, weight_dtype, include, device, devices, quantize)
    return QwenImageEditModels(
        transformer=loaded.get("transformer"),
        vae=loaded.get("vae"),
        text_encoder=loaded.get("text_encoder"),
        tokenizer=load_qwen_image_edit_tokenizer(path),
        processor=load_qwen_image_edit_processor(path),
        scheduler=load_qwen_image_edit_scheduler(path),
    )
