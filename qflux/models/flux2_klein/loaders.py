"""Loading FLUX.2 [klein] from a diffusers-layout folder: one table of its components.

Each weight component loads frozen, in eval mode, on its device (:func:`qflux.weights.loading.load_part`).
"""

from __future__ import annotations

import functools

import attrs

from qflux.weights.loading import Components, ModelFiles, Table

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
class Flux2KleinModels(Components):
    """The frozen components one job needs (:func:`table`): the shared ones, Qwen3 as ``text_encoder``."""


FLUX2_KLEIN = ModelFiles(PIPELINE, table, Flux2KleinModels)
"""The FLUX.2 [klein] folder layout (:func:`qflux.weights.loading.load_part` loads one component of it)."""

load_flux2_klein = FLUX2_KLEIN.load
"""``load_flux2_klein(model_path, weight_dtype, *, include, devices, quantize)``: a job's components as
:class:`Flux2KleinModels` (:meth:`qflux.weights.loading.ModelFiles.load`)."""
