"""``python -m qflux.models.reference README.md``: rewrite the README's configuration reference of every family
from its schema (:mod:`qflux.config.reference`); a test keeps the README current."""

from __future__ import annotations

import sys

from qflux.config.reference import markers, update_file
from qflux.models import FAMILIES

REFERENCES: dict[tuple[str, str], type] = {markers(f.reference): f.config for f in FAMILIES.values()}
"""Each generated table: (start marker, end marker) → the schema it documents."""

if __name__ == "__main__":  # pragma: no cover - exercised through update_file in tests
    for arg in sys.argv[1:] or ["README.md"]:
        print(f"{arg}: {'updated' if update_file(arg, REFERENCES) else 'already current'}")
