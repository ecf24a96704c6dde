"""Loading FLUX.1 Kontext from a diffusers-layout folder: one table of its components.

Each weight component loads frozen, in eval mode, on its device (:func:`qflux.weights.loading.load_part`);
loading one never loads the others, so training from a cache skips the text encoders entirely.
"""

from __future__ import annotations

import functools
from typing import Any

import attrs

from qflux.weights.loading import Components, ModelFiles, Table

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
class FluxKontextModels(Components):
    """The frozen components one job needs (:func:`table`): the shared ones, CLIP as ``text_encoder`` and
    ``tokenizer``, and T5."""

    text_encoder_2: Any
    """``T5EncoderModel``, or None when the job reads prompt embeddings from the cache."""
    tokenizer_2: Any


FLUX_KONTEXT = ModelFiles(PIPELINE, table, FluxKontextModels)
"""The FLUX.1 Kontext folder layout (:func:`qflux.weights.loading.load_part` loads one component of it)."""

load_flux_kontext = FLUX_KONTEXT.load
"""``load_flux_kontext(model_path, weight_dtype, *, include, devices, quantize)``: a job's components as
:class:`FluxKontextModels` (:meth:`qflux.weights.loading.ModelFiles.load`)."""
