"""Loading FLUX.2 from a diffusers-layout folder: one table of components per variant, and the
:class:`Variant` record that tells [klein] from [dev] everywhere else in this folder.

Each weight component loads frozen, in eval mode, on its device (:func:`qflux.weights.loading.load_part`).
"""

from __future__ import annotations

import functools
from typing import Any

import attrs

from qflux.models.flux2.text import MISTRAL3, QWEN3, TextEncoder, chat_tokenizer
from qflux.weights.loading import Components, ModelFiles, Table

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
ENCODERS = ("vae", "text_encoder")
"""Components used only to encode images and prompts."""


def _shared() -> Table:
    # deferred: diffusers is a heavy import
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    return {"transformer": Flux2Transformer2DModel, "vae": AutoencoderKLFlux2,
            "scheduler": FlowMatchEulerDiscreteScheduler}  # fmt: skip


@functools.cache
def klein_table() -> Table:
    """{component: how it loads}: the Flux2 transformer, its autoencoder (images [B, 3, H, W] ↔
    latents [B, C, H/8, W/8], normalised after 2×2 patchifying by its batch-norm statistics), the
    Qwen3 causal LM (hidden states of three layers), its tokenizer and the flow-matching scheduler."""
    # deferred: transformers is a heavy import
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    return {**_shared(), "text_encoder": Qwen3ForCausalLM, "tokenizer": AutoTokenizer}


@functools.cache
def dev_table() -> Table:
    """{component: how it loads}: [klein]'s transformer, VAE and scheduler; Mistral Small 3.1
    (``Mistral3ForConditionalGeneration``, hidden states of three layers) and the tokenizer of its Pixtral
    processor folder (:func:`qflux.models.flux2.text.chat_tokenizer`)."""
    # deferred: transformers is a heavy import
    from transformers import Mistral3ForConditionalGeneration

    return {**_shared(), "text_encoder": Mistral3ForConditionalGeneration, "tokenizer": chat_tokenizer}


@attrs.frozen(eq=False)
class Flux2Models(Components):
    """The frozen components one job needs: the shared ones, the variant's prompt encoder as ``text_encoder``."""


@attrs.frozen
class Variant:
    """A FLUX.2 model: its folder layout, prompt encoder and diffusers pipeline."""

    files: ModelFiles[Flux2Models]
    """Its folder (:func:`qflux.weights.loading.load_part` loads one component of it)."""
    text: TextEncoder
    """Its prompt encoder."""
    pipeline_class: str
    """The diffusers pipeline that runs it and reads its LoRA files."""

    @property
    def pipeline(self) -> str:
        """Its name in messages."""
        return self.files.pipeline

    def pipeline_cls(self) -> Any:
        """The pipeline class (LoRA files are written and read through it)."""
        # deferred: diffusers is a heavy import
        import diffusers

        return getattr(diffusers, self.pipeline_class)


KLEIN = Variant(ModelFiles("FLUX.2 [klein]", klein_table, Flux2Models), QWEN3, "Flux2KleinPipeline")
"""FLUX.2 [klein] (4B and 9B, base and step-distilled): Qwen3, CFG against the empty prompt."""
DEV = Variant(ModelFiles("FLUX.2 [dev]", dev_table, Flux2Models), MISTRAL3, "Flux2Pipeline")
"""FLUX.2 [dev] (32B): Mistral Small 3.1, guidance-distilled (its transformer's ``guidance_embeds``)."""
