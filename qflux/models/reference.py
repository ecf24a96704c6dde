"""``python -m qflux.models.reference README.md``: rewrite the README's configuration reference of every family
from its schema (:mod:`qflux.config.reference`); a test keeps the README current."""

from __future__ import annotations

import sys

from qflux.config.reference import markers, update_file
from qflux.models.flux2_klein.config import Flux2KleinConfig
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.qwen_image_edit.config import QwenImageEditConfig

REFERENCES: dict[tuple[str, str], type] = {
    markers(""): FluxKontextConfig,
    markers("qwen-"): QwenImageEditConfig,
    markers("klein-"): Flux2KleinConfig,
}
"""Each generated table: (start marker, end marker) → the schema it documents."""

if __name__ == "__main__":  # pragma: no cover - exercised through update_file in tests
    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'updated' if update_file(arg, REFERENCES) else 'already current'}")
