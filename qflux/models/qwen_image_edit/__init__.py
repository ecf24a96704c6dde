"""Qwen-Image-Edit, -2509 (Edit-Plus) and -2511: the model-specific parts on the shared core."""

from functools import partial
from pathlib import Path

from qflux.models.qwen_image_edit.conditioning import encode_prompt
from qflux.models.qwen_image_edit.config import BUILTIN, QwenImageEditConfig
from qflux.models.qwen_image_edit.loaders import COMPONENTS, ENCODERS, PIPELINE
from qflux.models.qwen_image_edit.names import NAMES, NAMING
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.train.builtin import BuiltinModel
from qflux.train.family import Family

__all__ = ["FAMILY", "encode_prompt"]


def _folder(variant: str | None) -> str:
    return f"tiny-qwen-image-{(variant or 'edit').replace('_', '-')}-seed0"


def _build(path: Path, variant: str | None) -> Path:
    return build_qwen_image_edit(path, seed=0, variant=variant or "edit")


FAMILY = Family(name="qwen_image_edit", pipeline=PIPELINE, config=QwenImageEditConfig, reference="qwen-",
                components=COMPONENTS, encoders=ENCODERS, naming=NAMING, names=NAMES,
                tiny={"qwen_image_edit": build_qwen_image_edit,
                      "qwen_image_edit_plus": partial(build_qwen_image_edit, variant="edit_plus"),
                      "qwen_image_edit_2511": partial(build_qwen_image_edit, variant="edit_2511")},
                builtin=(BUILTIN, BuiltinModel(_folder, _build)), shapes=Path(__file__).parent / "shapes")  # fmt: skip
"""What the recipe and the commands read of this family (registered by :mod:`qflux.models`)."""
