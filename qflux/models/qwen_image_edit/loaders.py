"""Loading Qwen-Image-Edit(-Plus) from a diffusers-layout folder: one table of its components.

The same contract as FLUX.1 Kontext's (:mod:`qflux.weights.loading`): frozen, eval mode, on the requested
device, one-sentence errors naming the folder. The processor is rebuilt without torchvision
(:mod:`qflux.models.qwen_image_edit.processor`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import attrs

from qflux.config.errors import QfluxError
from qflux.models.qwen_image_edit.processor import load_qwen_processor
from qflux.weights.loading import Components, ModelFiles, Table, component_config

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
    # deferred: diffusers is a heavy import
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    # deferred: transformers is a heavy import
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return {
        "transformer": QwenImageTransformer2DModel,
        "vae": AutoencoderKLQwenImage,
        "text_encoder": Qwen2_5_VLForConditionalGeneration,
        "tokenizer": AutoTokenizer,
        "processor": load_qwen_processor,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }


@attrs.frozen(eq=False)
class QwenImageEditModels(Components):
    """What one Qwen-Image-Edit job needs (:func:`table`): the shared components, Qwen2.5-VL as
    ``text_encoder`` with the Qwen2 tokenizer for the text-only template, and the processor."""

    processor: Any
    """``Qwen2VLProcessor``: the prompt template with its control image(s)."""


QWEN_IMAGE_EDIT = ModelFiles(PIPELINE, table, QwenImageEditModels)
"""The Qwen-Image-Edit folder layout (:func:`qflux.weights.loading.load_part` loads one component of it)."""

load_qwen_image_edit = QWEN_IMAGE_EDIT.load
"""``load_qwen_image_edit(model_path, weight_dtype, *, include, devices, quantize)``: a job's components as
:class:`QwenImageEditModels` (:meth:`qflux.weights.loading.ModelFiles.load`)."""


def check_variant(path: Path, variant: str) -> None:
    """Refuse a folder whose transformer is not the ``model.variant`` it is trained or run as:
    Qwen-Image-Edit-2511's has ``zero_cond_t: true`` in transformer/config.json (its control tokens
    are modulated at t = 0), 2509's and the first Edit's do not.

    Raises:
        QfluxError: naming the folder, what its config says and the variant to set.
    """

    zero = bool(component_config(path, "transformer").get("zero_cond_t", False))
    if zero and variant != "edit_2511":
        raise QfluxError(
            f"'{path}' is a Qwen-Image-Edit-2511 model (zero_cond_t: true in transformer/config.json); set "
            "model.variant: edit_2511"
        )
    if variant == "edit_2511" and not zero:
        raise QfluxError(
            f"model.variant: edit_2511 expects a Qwen-Image-Edit-2511 transformer (zero_cond_t: true in "
            f"transformer/config.json); '{path}' has none: set model.variant: edit_plus (2509) or edit"
        )
