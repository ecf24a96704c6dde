"""FLUX.1 Kontext's configuration: its model section, its devices and the recipe's root."""

from __future__ import annotations

from typing import ClassVar

import attrs
from attrs import validators as v

from qflux.config.schema import Devices, ModelSection, RecipeConfig, device_field, non_negative

BUILTIN = "builtin:tiny-flux-kontext"
"""The tiny random FLUX.1 Kontext qflux builds offline."""


@attrs.frozen
class FluxKontextModel(ModelSection):
    """The FLUX.1 Kontext model section."""

    recipe: ClassVar[str] = "flux_kontext_lora"
    pretrained_model_name_or_path: str = BUILTIN
    """Local diffusers folder or hub id; 'builtin:tiny-flux-kontext' builds a tiny random model."""
    max_sequence_length: int = attrs.field(default=512, validator=v.and_(v.ge(1), v.le(512)))
    """T5 token length of the prompt embedding (FLUX.1 uses 512)."""
    guidance_scale: float = attrs.field(default=2.5, validator=non_negative)
    """Guidance value fed to the guidance-distilled transformer: in training, in validation and the
    sample, and predict's default (Kontext's own)."""


@attrs.frozen
class FluxDevices(Devices):
    """Where each FLUX.1 Kontext component runs."""

    text_encoder_2: str = device_field()
    """T5."""


@attrs.frozen
class FluxKontextConfig(RecipeConfig):
    """The FLUX.1 Kontext LoRA recipe's configuration."""

    model: FluxKontextModel = attrs.field(factory=FluxKontextModel)
    """FLUX.1 Kontext, and how its frozen weights are held."""
    devices: FluxDevices = attrs.field(factory=FluxDevices)
    """Where each FLUX.1 Kontext component runs."""
