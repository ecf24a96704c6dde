"""The built-in demo assets: the tiny model and the synthetic dataset, made once and reused.

They live under ``$QFLUX_HOME`` (default ``~/.cache/qflux``) and are built into a temporary
folder that is renamed into place, so an interrupted build never leaves a half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import attrs

from qflux.config.errors import QfluxError
from qflux.config.schema import BUILTIN_SYNTHETIC_DATASET
from qflux.data.synthetic import make_synthetic_pairs

SYNTHETIC_TRAIN = 24
SYNTHETIC_HELDOUT = 8


def qflux_home() -> Path:
    """``$QFLUX_HOME`` or ``~/.cache/qflux``."""
    return Path(os.environ.get("QFLUX_HOME", "~/.cache/qflux")).expanduser()


def _build_once(name: str, build: Callable[[Path], object]) -> Path:
    final = qflux_home() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build(tmp)
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():  # a concurrent builder did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@attrs.frozen
class BuiltinModel:
    """A model qflux builds itself, offline, under a ``builtin:`` name."""

    folder: Callable[[str | None], str]
    """Its folder's name under ``$QFLUX_HOME`` for a variant (None: the family's default)."""
    build: Callable[[Path, str | None], object]
    """``build(folder, variant)`` writes it."""

    @classmethod
    def seed0(cls, folder: str, build: Callable[..., object]) -> BuiltinModel:
        """A family's one tiny model (no variants): ``build(folder, seed=0)`` under ``folder``."""
        return cls(lambda _: folder, lambda path, _: build(path, seed=0))


BUILTIN_MODELS: dict[str, BuiltinModel] = {}
"""``builtin:<name>`` → its model; each model family adds its own when imported (``qflux/models/<family>/``)."""


def register_builtin_model(name: str, model: BuiltinModel) -> None:
    """Make ``name`` (``builtin:...``) resolve to ``model``."""
    BUILTIN_MODELS[name] = model


def resolve_model_path(name_or_path: str, variant: str | None = None) -> str:
    """A registered ``builtin:`` name (of ``variant``) as its built folder; other values pass through.

    Raises:
        QfluxError: a ``builtin:`` name no model family registered.
    """
    if not name_or_path.startswith("builtin:") or name_or_path == BUILTIN_SYNTHETIC_DATASET:
        return name_or_path
    model = BUILTIN_MODELS.get(name_or_path)
    if model is None:
        raise QfluxError(f"unknown built-in model '{name_or_path}'; the built-in models are {sorted(BUILTIN_MODELS)}")
    return str(_build_once(model.folder(variant), lambda p: model.build(p, variant)))


def resolve_dataset_path(path: str, *, heldout: bool = False) -> Path:
    """Map ``builtin:synthetic`` to the synthetic training set (or its held-out set); others pass through."""
    if path != BUILTIN_SYNTHETIC_DATASET:
        return Path(path)

    if heldout:
        return _build_once("synthetic-heldout", lambda p: make_synthetic_pairs(p, SYNTHETIC_HELDOUT, seed=1))
    return _build_once("synthetic-train", lambda p: make_synthetic_pairs(p, SYNTHETIC_TRAIN, seed=0))
