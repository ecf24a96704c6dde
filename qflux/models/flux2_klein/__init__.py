"""FLUX.2 [klein]: multi-reference image editing (Qwen3 text encoder, Flux2 transformer and VAE)."""

from pathlib import Path

from qflux.lora.formats import register_naming
from qflux.models.flux2_klein.conditioning import encode_prompt
from qflux.models.flux2_klein.config import BUILTIN
from qflux.models.flux2_klein.names import NAMES, NAMING
from qflux.models.flux2_klein.tiny import build_flux2_klein
from qflux.train.builtin import BuiltinModel, register_builtin_model
from qflux.weights.shapes import register_shapes

__all__ = ["TINY", "encode_prompt"]

TINY = {"flux2_klein": build_flux2_klein}
"""``python -m qflux.tiny`` names → builder."""
register_builtin_model(
    BUILTIN, BuiltinModel(lambda _: "tiny-flux2-klein-seed0", lambda p, _: build_flux2_klein(p, seed=0))
)
register_naming(NAMING, NAMES)
register_shapes(Path(__file__).parent / "shapes")
