"""FLUX.2's configurations, [klein]'s and [dev]'s: their model sections and the recipes' roots."""

from __future__ import annotations

from typing import ClassVar

import attrs
from attrs import validators as v

from qflux.config.schema import LoraConfig, ModelSection, RecipeConfig, non_negative

BUILTIN = "builtin:tiny-flux2-klein"
"""The tiny random FLUX.2 [klein] qflux builds offline."""


DEV_BUILTIN = "builtin:tiny-flux2-dev"
"""The tiny random FLUX.2 [dev] qflux builds offline."""


FLUX2_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")
"""FLUX.2's attention inputs and outputs: the double blocks' q, k, v and output, the single blocks'
fused q/k/v/MLP projection (their ``attn.to_out`` shares its name with the double blocks' list)."""


def _flux2_lora() -> LoraConfig:
    return LoraConfig(target_modules=FLUX2_TARGETS)


@attrs.frozen
class Flux2KleinModel(ModelSection):
    """The FLUX.2 [klein] model section."""

    recipe: ClassVar[str] = "flux2_klein_lora"
    pretrained_model_name_or_path: str = BUILTIN
    """Local diffusers folder or hub id; 'builtin:tiny-flux2-klein' builds a tiny random model."""
    max_sequence_length: int = attrs.field(default=512, validator=v.and_(v.ge(1), v.le(512)))
    """Qwen3 token length of the prompt embedding (the pipeline's 512)."""
    guidance_scale: float = attrs.field(default=4.0, validator=non_negative)
    """Classifier-free guidance against the empty prompt for predict's default (the pipeline's 4.0;
    off at 1 or below, and on a step-distilled model)."""
    lora: LoraConfig = attrs.field(factory=lambda: _flux2_lora())
    """The adapter; by default on the double blocks' attention and the single blocks' fused
    q/k/v/MLP input projection."""


@attrs.frozen
class Flux2KleinConfig(RecipeConfig):
    """The FLUX.2 [klein] LoRA recipe's configuration."""

    model: Flux2KleinModel = attrs.field(factory=Flux2KleinModel)
    """FLUX.2 [klein], and how its frozen weights are held."""


@attrs.frozen
class Flux2DevModel(ModelSection):
    """The FLUX.2 [dev] model section."""

    recipe: ClassVar[str] = "flux2_dev_lora"
    pretrained_model_name_or_path: str = DEV_BUILTIN
    """Local diffusers folder or hub id; 'builtin:tiny-flux2-dev' builds a tiny random model."""
    max_sequence_length: int = attrs.field(default=512, validator=v.and_(v.ge(1), v.le(512)))
    """Mistral token length of the prompt embedding, BFL's system message included (the pipeline's 512)."""
    guidance_scale: float = attrs.field(default=4.0, validator=non_negative)
    """Guidance value fed to the guidance-distilled transformer: in training, in validation and the
    sample, and predict's default (the pipeline's 4.0)."""
    lora: LoraConfig = attrs.field(factory=lambda: _flux2_lora())
    """The adapter; by default on the double blocks' attention and the single blocks' fused
    q/k/v/MLP input projection (as for [klein])."""


@attrs.frozen
class Flux2DevConfig(RecipeConfig):
    """The FLUX.2 [dev] LoRA recipe's configuration."""

    model: Flux2DevModel = attrs.field(factory=Flux2DevModel)
    """FLUX.2 [dev], and how its frozen weights are held."""
