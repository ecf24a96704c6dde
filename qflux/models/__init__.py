"""The model families, one folder each (``qflux/models/<family>/``): config section, loaders, conditioning, loss,
predict, cache, plan model, ComfyUI name table, tiny builder and published shapes. FLUX.2's folder holds two
variants, [klein] and [dev], each a family record with its own recipe. Families never import each other.
:data:`FAMILIES` is the one registry of them all (a new family adds one line here), and importing any family
registers every family's built-in model, naming and shapes (:func:`qflux.train.family.register`)."""

from collections.abc import Callable
from pathlib import Path

from qflux.models import flux2, flux_kontext, qwen_image_edit
from qflux.train.family import Family, register

__all__ = ["FAMILIES", "TINY_MODELS"]

FAMILIES: dict[str, Family] = {
    f.name: f for f in (flux_kontext.FAMILY, qwen_image_edit.FAMILY, flux2.KLEIN_FAMILY, flux2.DEV_FAMILY)
}
"""Every family by name."""
for _family in FAMILIES.values():
    register(_family)
TINY_MODELS: dict[str, Callable[..., Path]] = {name: build for f in FAMILIES.values() for name, build in f.tiny.items()}
"""Every family's tiny builders by their ``python -m qflux.tiny`` name."""
