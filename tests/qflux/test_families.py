"""The family registry: each family's record agrees with its folder, its recipe and the registries it fills."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from qflux.lora.formats import NAMINGS
from qflux.models import FAMILIES, TINY_MODELS
from qflux.train.builtin import BUILTIN_MODELS
from qflux.train.family import Family


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_record_matches_its_folder_and_recipe(name: str) -> None:
    family = FAMILIES[name]
    assert family.name == name
    # its folder: qflux/models/<name>, or for a variant the architecture's (flux2 for flux2_klein, flux2_dev)
    folder = name if importlib.util.find_spec(f"qflux.models.{name}") else name.rsplit("_", 1)[0]
    records = [v for v in vars(importlib.import_module(f"qflux.models.{folder}")).values() if isinstance(v, Family)]
    assert any(r is family for r in records)
    recipe = importlib.import_module(f"recipes.{name}_lora")
    assert recipe.FAMILY is family
    model = family.config().model  # the recipe's root config, with this family's model section
    assert type(model).recipe == f"{name}_lora"
    assert model.pretrained_model_name_or_path in BUILTIN_MODELS  # its built-in tiny model is registered
    assert family.naming in NAMINGS
    assert set(family.encoders) <= set(family.components) and "transformer" in family.components
    assert name in family.tiny and all(TINY_MODELS[n] is b for n, b in family.tiny.items())
