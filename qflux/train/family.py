"""What a model family tells the shared code, its recipe and the commands: one small typed record per
``qflux/models/<family>/`` (its ``FAMILY``), collected in :data:`qflux.models.FAMILIES`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import attrs


@attrs.frozen
class Family:
    """A model family as the recipe and the commands read it."""

    name: str
    """Its folder under ``qflux/models/`` and its recipe's stem (``recipes/<name>_lora.py``)."""
    pipeline: str
    """How messages name it (the start block's first line, errors)."""
    config: type
    """Its recipe's root config (:class:`qflux.config.schema.RecipeConfig` with its model section)."""
    components: tuple[str, ...]
    """The subfolders of its diffusers folder a run reads."""
    encoders: tuple[str, ...]
    """The components that encode the data (the cache stands in for them)."""
    naming: str
    """The name of its ComfyUI name table (:data:`qflux.lora.formats.NAMINGS`)."""
    tiny: Mapping[str, Callable[..., Path]]
    """``python -m qflux.tiny`` names → its tiny builders."""
    reference: str
    """The prefix of its config table's markers in the README (:func:`qflux.config.reference.markers`)."""
