"""The built-in assets: models and datasets qflux makes itself, offline, under ``builtin:`` names, made once
and reused. The model families register their models (``qflux/models/<family>/``), :mod:`qflux.toy` its
datasets (``builtin:toy-<edit>``); ``builtin:synthetic`` is here.

They live under ``$QFLUX_HOME`` (default ``~/.cache/qflux``) and are built into a temporary
folder that is renamed into place, so an interrupted build never leaves a half-written folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from qflux.config.data import BUILTIN_SYNTHETIC_DATASET
from qflux.config.errors import QfluxError
from qflux.data.synthetic import make_synthetic_pairs

SYNTHETIC_TRAIN = 24
SYNTHETIC_HELDOUT = 8


def qflux_home() -> Path:
    """``$QFLUX_HOME`` or ``~/.cache/qflux``."""
    return Path(os.environ.get("QFLUX_HOME", "~/.cache/qflux")).expanduser()


def files_digest(root: Path, paths: Sequence[Path]) -> str:
    """The first 10 hex digits of the sha256 of ``paths`` (each its path relative to ``root``, then its bytes):
    a built-in folder's name carries the digest of what made it, so a changed source lands in a new folder."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


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
    if not name_or_path.startswith("builtin:") or name_or_path in BUILTIN_DATASETS:
        return name_or_path
    model = BUILTIN_MODELS.get(name_or_path)
    if model is None:
        raise QfluxError(f"unknown built-in model '{name_or_path}'; the built-in models are {sorted(BUILTIN_MODELS)}")
    return str(_build_once(model.folder(variant), lambda p: model.build(p, variant)))


@attrs.frozen
class BuiltinDataset:
    """A dataset qflux writes itself, offline, under a ``builtin:`` name: a training set and a held-out set
    (validation's default when training on it)."""

    folder: str
    """Its folders' name under ``$QFLUX_HOME`` (``<folder>-train``, ``<folder>-heldout``)."""
    build: Callable[[Path, bool], object]
    """``build(folder, heldout)`` writes the training set, or with ``heldout`` the held-out one."""


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    BUILTIN_SYNTHETIC_DATASET: BuiltinDataset(
        "synthetic", lambda p, heldout: make_synthetic_pairs(p, SYNTHETIC_HELDOUT if heldout else SYNTHETIC_TRAIN,
                                                             seed=int(heldout))
    )
}  # fmt: skip
"""``builtin:<name>`` → its dataset (:mod:`qflux.toy` adds the toy world's, one per edit)."""


def register_builtin_dataset(name: str, dataset: BuiltinDataset) -> None:
    """Make ``name`` (``builtin:...``) resolve to ``dataset``."""
    BUILTIN_DATASETS[name] = dataset


def resolve_dataset_path(path: str, *, heldout: bool = False) -> Path:
    """A registered ``builtin:`` dataset as its written training (or held-out) folder; other paths pass through.

    Raises:
        QfluxError: a ``builtin:`` name no one registered.
    """
    if not path.startswith("builtin:"):
        return Path(path)
    dataset = BUILTIN_DATASETS.get(path)
    if dataset is None:
        raise QfluxError(f"data.dataset_path: unknown built-in dataset '{path}'; the built-in datasets are "
                         f"{', '.join(sorted(BUILTIN_DATASETS))}, or name a folder of pairs")  # fmt: skip
    return _build_once(f"{dataset.folder}-{'heldout' if heldout else 'train'}", lambda p: dataset.build(p, heldout))
