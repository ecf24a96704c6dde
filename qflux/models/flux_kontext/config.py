"""FLUX.1 Kontext's configuration: its model section, its devices and the recipe's root."""

from __future__ import annotations

from typing import ClassVar

import attrs
from attrs import validators as v

from qflux.config.schema import (
    DataConfig,
    Devices,
    LoraConfig,
    ModelSection,
    RecipeConfig,
    TrainConfig,
    device_field,
    non_negative,
)
from qflux.lora.kinds import ALL_LINEAR

BUILTIN = "builtin:tiny-flux-kontext"
"""The tiny random FLUX.1 Kontext qflux builds offline (tests and parity)."""
TOY = "builtin:toy-flux-kontext"
"""The toy FLUX.1 Kontext, trained on the toy world (:mod:`qflux.toy`): the default run's model."""
TOY_EDIT = "builtin:toy-invert"
"""The default run's dataset: 64 toy-world pairs of an edit the toy model was never taught."""


@attrs.frozen
class FluxKontextModel(ModelSection):
    """The FLUX.1 Kontext model section."""

    recipe: ClassVar[str] = "flux_kontext_lora"
    pretrained_model_name_or_path: str = TOY
    """Local diffusers folder or hub id; 'builtin:toy-flux-kontext' is the toy model trained on the toy world
    (docs/toy_world.md), 'builtin:tiny-flux-kontext' a tiny random one."""
    max_sequence_length: int | None = attrs.field(default=None, validator=v.optional(v.and_(v.ge(1), v.le(512))))
    """T5 token length of the prompt embedding; null: the model folder's T5 tokenizer's ``model_max_length``
    (512 for FLUX.1 Kontext, 32 for the toy model)."""
    guidance_scale: float = attrs.field(default=2.5, validator=non_negative)
    """Guidance value fed to the guidance-distilled transformer: in training, in validation and the
    sample, and predict's default (Kontext's own)."""
    lora: LoraConfig = attrs.field(factory=lambda: LoraConfig(target_modules=(ALL_LINEAR,)))
    """The adapter; FLUX.1 Kontext's default adapts every linear layer of the transformer (kohya's FLUX
    LoRAs adapt every linear layer of the blocks: attention, MLP and modulation), not only attention's q,
    k, v and out as diffusers' script does: on the toy world it learns more in the same steps
    (docs/what_options_do.md)."""


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
    data: DataConfig = attrs.field(factory=lambda: DataConfig(dataset_path=TOY_EDIT, batch_size=8))
    """The paired dataset and batching (the default: the toy world's ``invert`` pairs, an edit the toy model
    was never taught, 8 per step)."""
    train: TrainConfig = attrs.field(factory=lambda: TrainConfig(max_train_steps=300, loss_mask="auto"))
    """The training loop (the default run: 300 steps, the loss weighted towards where each pair changes,
    about a minute and a half on 2 CPU cores)."""
    devices: FluxDevices = attrs.field(factory=FluxDevices)
    """Where each FLUX.1 Kontext component runs."""
