"""Published ``config.json`` files of the supported hub models, shipped as shapes only (no weights),
so that ``plan`` runs offline with nothing downloaded. One folder per hub id (``owner__name``), one
subfolder per component, as in the diffusers layout; docs/memory.md names their sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent


def shipped_ids() -> list[str]:
    """The hub ids whose shapes qflux ships."""
    return sorted(p.name.replace("__", "/", 1) for p in ROOT.iterdir() if p.is_dir() and "__" in p.name)


def shipped_configs(hub_id: str) -> dict[str, dict[str, Any]] | None:
    """{component: its config.json} of ``hub_id``, or None when qflux ships no shapes for it."""
    folder = ROOT / hub_id.replace("/", "__", 1)
    if "/" not in hub_id or not folder.is_dir():
        return None
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/config.json"))}
