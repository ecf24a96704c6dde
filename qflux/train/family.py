"""What a model family tells the shared code, its recipe and the commands: one small typed record per
``qflux/models/<family>/`` (its ``FAMILY``), collected in :data:`qflux.models.FAMILIES`, which
:func:`register`\\ s each: its built-in model, its ComfyUI names and its published shapes."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from qflux.config.errors import QfluxError
from qflux.lora.formats import ComfyNames, register_naming
from qflux.train.builtin import BuiltinModel, files_digest, register_builtin_model
from qflux.weights.loading import ModelFiles
from qflux.weights.shapes import register_shapes

if TYPE_CHECKING:  # run.py imports this module: the records are named for the type checker alone
    from qflux.train.batch import DataPath
    from qflux.train.run import ModelOps


@attrs.frozen
class ToyModel:
    """How ``python -m qflux.toy`` builds and writes a family's toy model (:mod:`qflux.toy`): the random start,
    the component table its stages load with, the data path and functions pretraining uses, and the committed
    folder."""

    start: Callable[[Path, Sequence[str], int], Path]
    """``start(folder, words, seed)`` writes the untrained model; ``words`` are the toy grammar's."""
    files: ModelFiles[Any]
    """The family's component table (:func:`qflux.weights.loading.load_part` reads a component with it)."""
    paths: Callable[[Any], tuple[DataPath, ModelOps]]
    """``paths(models)``: the data path and the model's functions that pretraining the transformer uses."""
    folder: Path
    """Where the trained toy model is committed (a diffusers folder, bf16 weights)."""

    def digest(self) -> str:
        """The first 10 hex digits of the sha256 of the committed folder (each file's path and bytes): its
        built-in copy's folder name carries it, so a changed toy is copied anew, never read stale."""
        return files_digest(self.folder, sorted(p for p in self.folder.rglob("*") if p.is_file()))

    def write(self, out: Path) -> Path:
        """Copy the committed toy model to ``out`` (a new folder)."""
        if not (self.folder / "model_index.json").exists():
            raise QfluxError(f"no toy model is committed at {self.folder}; build one with python -m qflux.toy build")
        shutil.copytree(self.folder, out, dirs_exist_ok=True)
        return out


@attrs.frozen
class Family:
    """A model family as the recipe and the commands read it."""

    name: str
    """Its recipe's stem (``recipes/<name>_lora.py``); its folder under ``qflux/models/`` is the name, or the
    name's architecture for a variant (``flux2`` for ``flux2_klein`` and ``flux2_dev``)."""
    pipeline: str
    """How messages name it (the start block's first line, errors)."""
    config: type
    """Its recipe's root config (:class:`qflux.config.schema.RecipeConfig` with its model section)."""
    reference: str
    """The prefix of its config table's markers in the README (:func:`qflux.config.reference.markers`)."""
    components: tuple[str, ...]
    """The subfolders of its diffusers folder a run reads."""
    encoders: tuple[str, ...]
    """The components that encode the data (the cache stands in for them)."""
    naming: str
    """The name of its ComfyUI name table (:data:`qflux.lora.formats.NAMINGS`)."""
    names: ComfyNames
    """That table."""
    tiny: Mapping[str, Callable[..., Path]]
    """``python -m qflux.tiny`` names → its tiny builders."""
    builtin: tuple[str, BuiltinModel]
    """Its ``builtin:`` name (the config's default model) and the tiny model built under it."""
    shapes: Path
    """Its folder of published shapes (``<hub owner>__<name>/<component>/config.json``)."""
    same_shapes: Mapping[str, str] = attrs.field(factory=dict)
    """Hub ids whose shapes are another shipped id's (re-quantized copies)."""
    toy: ToyModel | None = None
    """Its toy model on the toy world, where it has one."""


def toy_name(family: Family) -> str:
    """The ``builtin:`` name of the family's toy model: ``builtin:toy-flux-kontext``."""
    return "builtin:toy-" + family.name.replace("_", "-")


def register(family: Family) -> None:
    """Make the family's built-in models (its tiny one, and its toy where it has one), ComfyUI naming and
    shapes known to the shared code."""
    register_builtin_model(*family.builtin)
    if family.toy is not None:
        toy = family.toy
        # under $QFLUX_HOME/toy-<family>-<digest>: a changed toy lands in a new folder
        folder = toy_name(family)[len("builtin:") :]
        register_builtin_model(
            toy_name(family), BuiltinModel(lambda _: f"{folder}-{toy.digest()}", lambda p, _: toy.write(p))
        )
    register_naming(family.naming, family.names)
    register_shapes(family.shapes, family.same_shapes)
