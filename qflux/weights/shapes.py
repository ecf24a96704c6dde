"""Published ``config.json`` files of the supported hub models, shipped as shapes only (no weights), so
that ``plan`` and ``check`` run offline with nothing downloaded. Each model family ships its own folder
(``qflux/models/<family>/shapes/``: one folder per hub id ``owner__name``, one subfolder per component as
in the diffusers layout, and SOURCES.md naming where each file was read) and registers it here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FOLDERS: list[Path] = []
"""The registered shapes folders (:func:`register_shapes`)."""
SAME_SHAPES: dict[str, str] = {}
"""Hub ids of re-quantized copies of a shipped model → that model's hub id: the same architecture, so the
same shapes."""


def register_shapes(folder: Path, same: Mapping[str, str] | None = None) -> None:
    """Ship the hub ids under ``folder`` (and ``same``: copies of them under other hub ids)."""
    if folder not in FOLDERS:
        FOLDERS.append(folder)
    SAME_SHAPES.update(same or {})


def _folder(hub_id: str) -> Path | None:
    name = SAME_SHAPES.get(hub_id, hub_id).replace("/", "__", 1)
    return next((root / name for root in FOLDERS if (root / name).is_dir()), None)


def shipped_ids() -> list[str]:
    """The hub ids whose shapes qflux ships."""
    shipped = [
        p.name.replace("__", "/", 1) for root in FOLDERS for p in root.iterdir() if p.is_dir() and "__" in p.name
    ]
    return sorted([*shipped, *SAME_SHAPES])


def shipped_configs(hub_id: str) -> dict[str, dict[str, Any]] | None:
    """{component: its config.json} of ``hub_id``, or None when qflux ships no shapes for it."""
    folder = _folder(hub_id) if "/" in hub_id else None
    if folder is None:
        return None
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/config.json"))}


def published(name: str) -> dict[str, dict[str, Any]] | None:
    """:func:`shipped_configs` of ``model.pretrained_model_name_or_path`` = ``name``, unless it names
    a local folder (whose own config.json files then rule)."""
    return None if Path(name).expanduser().exists() else shipped_configs(name)
