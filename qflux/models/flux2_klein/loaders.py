"""Loading FLUX.2 [klein] from a diffusers-layout folder: one table of its components.

Each weight component loads frozen, in eval mode, on its device (:func:`qflux.weights.loading.load_part`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.weights.loading import ModelFiles, Table, load_parts

PIPELINE = "FLUX.2 [klein]"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
ENCODERS = ("vae", "text_encoder")
"""Components used only to encode images and prompts."""


@functools.cache
def table() -> Table:
    """{component: how it loads}: the Flux2 transformer, its autoencoder (images [B, 3, H, W] ↔
    latents [B, C, H/8, W/8], normalised after 2×2 patchifying by its batch-norm statistics), the
    Qwen3 causal LM (hidden states of three layers), its tokenizer and the flow-matching scheduler."""
    # deferred: diffusers is a heavy import
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    # deferred: transformers is a heavy import
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    return {
        "transformer": Flux2Transformer2DModel,
        "vae": AutoencoderKLFlux2,
        "text_encoder": Qwen3ForCausalLM,
        "tokenizer": AutoTokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }


@attrs.frozen(eq=False)
class Flux2KleinModels:
    """The frozen components one job needs; ``None`` where a job does not need one."""

    transformer: Any
    """``Flux2Transformer2DModel``."""
    vae: Any
    """``AutoencoderKLFlux2``."""
    text_encoder: Any
    """``Qwen3ForCausalLM``."""
    tokenizer: Any
    scheduler: Any


def load_flux2_klein(
    model_path: str | Path,
    weight_dtype: torch.dtype,
    *,
    include: Sequence[str] | None = None,
    devices: Mapping[str, str | torch.device] | None = None,
    quantize: Mapping[str, str] | None = None,
) -> Flux2KleinModels:
    """The components a job needs (:func:`qflux.weights.loading.load_parts`), on ``devices``, quantized as
    ``quantize`` says."""
    return Flux2KleinModels(
        **load_parts(FLUX2_KLEIN, model_path, weight_dtype, include=include, devices=devices, quantize=quantize)
    )


FLUX2_KLEIN = ModelFiles(PIPELINE, table)
"""The FLUX.2 [klein] folder layout."""
