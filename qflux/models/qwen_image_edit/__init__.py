"""Qwen-Image-Edit, -2509 (Edit-Plus) and -2511: the model-specific parts on the shared core."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

from qflux.lora.formats import register_naming
from qflux.models.qwen_image_edit.conditioning import encode_prompt
from qflux.models.qwen_image_edit.config import BUILTIN, QwenImageEditConfig
from qflux.models.qwen_image_edit.loaders import COMPONENTS, ENCODERS, PIPELINE
from qflux.models.qwen_image_edit.names import NAMES, NAMING
from qflux.models.qwen_image_edit.tiny import build_qwen_image_edit
from qflux.train.builtin import BuiltinModel, register_builtin_model
from qflux.train.family import Family
from qflux.weights.shapes import register_shapes

__all__ = ["FAMILY", "TINY", "encode_prompt"]

TINY: dict[str, Callable[..., Path]] = {
    "qwen_image_edit": build_qwen_image_edit,
    "qwen_image_edit_plus": partial(build_qwen_image_edit, variant="edit_plus"),
    "qwen_image_edit_2511": partial(build_qwen_image_edit, variant="edit_2511"),
}
"""``python -m qflux.tiny`` names → builder."""


def _folder(variant: str | None) -> str:
    return f"tiny-qwen-image-{(variant or 'edit').replace('_', '-')}-seed0"


register_builtin_model(
    BUILTIN, BuiltinModel(_folder, lambda p, variant: build_qwen_image_edit(p, seed=0, variant=variant or "edit"))
)
register_naming(NAMING, NAMES)
register_shapes(Path(__file__).parent / "shapes")

FAMILY = Family(
    name="qwen_image_edit",
    pipeline=PIPELINE,
    config=QwenImageEditConfig,
    components=COMPONENTS,
    encoders=ENCODERS,
    naming=NAMING,
    tiny=TINY,
    reference="qwen-",
)
"""What the recipe and the commands read of this family."""
