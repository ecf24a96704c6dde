"""The toy world (``python -m qflux.toy``): scenes of flat shapes, a grammar of edits on them, and the
datasets both make. Small enough for a CPU to train a model that really edits; independent of the model
families, whose toy models are trained on it.

Importing it registers one built-in dataset per edit, ``builtin:toy-<edit>``: :data:`TOY_PAIRS` pairs (seed 0)
and :data:`TOY_HELDOUT` held-out pairs (seed 1, validation's default) of 64 px scenes.
"""

from functools import partial
from pathlib import Path

from qflux.toy.edits import EDITS, TAUGHT, write_pairs, write_scenes
from qflux.toy.world import Scene, Shape, random_scene, render
from qflux.train.builtin import BuiltinDataset, files_digest, register_builtin_dataset

TOY_PAIRS = 64
"""Training pairs of a ``builtin:toy-<edit>`` dataset."""
TOY_HELDOUT = 16
"""Held-out pairs of a ``builtin:toy-<edit>`` dataset."""


_HERE = Path(__file__).parent
WORLD_DIGEST = files_digest(_HERE, [_HERE / name for name in ("__init__.py", "world.py", "edits.py")])
"""The first 10 hex digits of the sha256 of the world's source: a ``builtin:toy-<edit>`` dataset is written under
``$QFLUX_HOME/toy-<edit>-<digest>-train`` (and ``-heldout``), so a changed world writes its datasets anew."""


def _write(edit: str, folder: Path, heldout: bool) -> Path:
    return write_pairs(folder, [edit], TOY_HELDOUT if heldout else TOY_PAIRS, seed=int(heldout))


for _edit in EDITS:
    register_builtin_dataset(
        f"builtin:toy-{_edit}", BuiltinDataset(f"toy-{_edit}-{WORLD_DIGEST}", partial(_write, _edit))
    )

__all__ = ["EDITS", "TAUGHT", "Scene", "Shape", "random_scene", "render", "write_pairs", "write_scenes"]
