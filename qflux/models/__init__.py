"""The model families, one folder each (``qflux/models/<family>/``): config section, loaders, conditioning, loss,
predict, cache, plan model, ComfyUI name table and tiny builder. Families never import each other; importing
one registers its built-in model. This module is the one registry of them all."""

from collections.abc import Callable
from pathlib import Path

from qflux.models import flux2_klein, flux_kontext, qwen_image_edit

__all__ = ["TINY_MODELS"]

TINY_MODELS: dict[str, Callable[..., Path]] = {**flux_kontext.TINY, **qwen_image_edit.TINY, **flux2_klein.TINY}
"""Every family's tiny builders by their ``python -m qflux.tiny`` name."""
