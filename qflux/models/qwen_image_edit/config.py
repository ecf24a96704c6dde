"""Qwen-Image-Edit's configuration (Edit, 2509, 2511): its model section and the recipe's root."""

from __future__ import annotations

from typing import ClassVar, Literal

import attrs
from attrs import validators as v

from qflux.config.schema import ModelSection, RecipeConfig

BUILTIN = "builtin:tiny-qwen-image-edit"
"""The tiny random Qwen-Image-Edit qflux builds offline (of the configured variant)."""


@attrs.frozen
class QwenImageEditModel(ModelSection):
    """The Qwen-Image-Edit(-Plus) model section."""

    recipe: ClassVar[str] = "qwen_image_edit_lora"
    pretrained_model_name_or_path: str = BUILTIN
    """Local diffusers folder or hub id; 'builtin:tiny-qwen-image-edit' builds a tiny random model
    (of the configured variant)."""
    variant: Literal["edit", "edit_plus", "edit_2511"] = attrs.field(
        default="edit", validator=v.in_(("edit", "edit_plus", "edit_2511"))
    )
    """'edit': Qwen-Image-Edit, one control image per sample. 'edit_plus': Qwen-Image-Edit-2509,
    0 to 3 control images per sample (control_images/NAME, NAME_control_1, NAME_control_2), each
    seen by the vision-language encoder at ~384² and by the VAE. 'edit_2511': Qwen-Image-Edit-2511,
    Edit-Plus's inputs with the transformer's zero_cond_t (control tokens modulated at t = 0; its
    transformer/config.json says so)."""


@attrs.frozen
class QwenImageEditConfig(RecipeConfig):
    """The Qwen-Image-Edit(-Plus) LoRA recipe's configuration."""

    model: QwenImageEditModel = attrs.field(factory=QwenImageEditModel)
    """Qwen-Image-Edit, and how its frozen weights are held."""
