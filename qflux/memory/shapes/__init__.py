"""Published ``config.json`` files of the supported hub models, shipped as shapes only (no weights),
so that ``plan`` runs offline with nothing downloaded. One folder per hub id (``owner__name``), one
subfolder per component, as in the diffusers layout; docs/memory.md names their sources."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent
SAME_SHAPES = {
    "eramth/flux-kontext-4bit-fp4": "black-forest-labs/FLUX.1-Kontext-dev",
    "AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers": "black-forest-labs/FLUX.1-Kontext-dev",
}
"""Hub ids of re-quantized copies of a shipped model (the plan's pre-quantized checkpoints, used by
recipes/configs/flux_kontext_fp4.yaml and _fp8.yaml): the same architecture, so the same shapes."""


def shipped_ids() -> list[str]:
    """The hub ids whose shapes qflux ships."""
    shipped = [p.name.replace("__", "/", 1) for p in ROOT.iterdir() if p.is_dir() and "__" in p.name]
    return sorted([*shipped, *SAME_SHAPES])


def shipped_configs(hub_id: str) -> dict[str, dict[str, Any]] | None:
    """{component: its config.json} of ``hub_id``, or None when qflux ships no shapes for it."""
    folder = ROOT / SAME_SHAPES.get(hub_id, hub_id).replace("/", "__", 1)
    if "/" not in hub_id or not folder.is_dir():
        return None
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/config.json"))}


def published(name: str) -> dict[str, dict[str, Any]] | None:
    """:func:`shipped_configs` of ``model.pretrained_model_name_or_path`` = ``name``, unless it names
    a local folder (whose own config.json files then rule)."""
    return None if Path(name).expanduser().exists() else shipped_configs(name)
