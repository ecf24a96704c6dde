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

from qflux.config.schema import (
    BUILTIN_SYNTHETIC_DATASET,
    BUILTIN_TINY_FLUX2_KLEIN,
    BUILTIN_TINY_FLUX_KONTEXT,
    BUILTIN_TINY_QWEN_IMAGE_EDIT,
)

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


def resolve_model_path(name_or_path: str, variant: str | None = None) -> str:
    """Map ``builtin:tiny-flux-kontext``, ``builtin:tiny-flux2-klein`` and ``builtin:tiny-qwen-image-edit``
    (of ``variant``: edit, edit_plus or edit_2511) to their built folders; other values pass through."""
    if name_or_path == BUILTIN_TINY_FLUX_KONTEXT:
        from qflux.tiny import build_flux_kontext

        return str(_build_once("tiny-flux-kontext-seed0", lambda p: build_flux_kontext(p, seed=0)))
    if name_or_path == BUILTIN_TINY_FLUX2_KLEIN:
        from qflux.models.flux2_klein.tiny import build_flux2_klein

        return str(_build_once("tiny-flux2-klein-seed0", lambda p: build_flux2_klein(p, seed=0)))
    if name_or_path == BUILTIN_TINY_QWEN_IMAGE_EDIT:
        from qflux.tiny import build_qwen_image_edit

        kind = variant or "edit"
        name = f"tiny-qwen-image-{kind.replace('_', '-')}-seed0"
        return str(_build_once(name, lambda p: build_qwen_image_edit(p, seed=0, variant=kind)))
    return name_or_path


def resolve_dataset_path(path: str, *, heldout: bool = False) -> Path:
    """Map ``builtin:synthetic`` to the synthetic training set (or its held-out set); others pass through."""
    if path != BUILTIN_SYNTHETIC_DATASET:
        return Path(path)
    from qflux.data.synthetic import make_synthetic_pairs

    if heldout:
        return _build_once("synthetic-heldout", lambda p: make_synthetic_pairs(p, SYNTHETIC_HELDOUT, seed=1))
    return _build_once("synthetic-train", lambda p: make_synthetic_pairs(p, SYNTHETIC_TRAIN, seed=0))
