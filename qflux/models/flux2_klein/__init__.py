"""FLUX.2 [klein]: multi-reference image editing (Qwen3 text encoder, Flux2 transformer and VAE)."""

from pathlib import Path

from qflux.lora.formats import register_naming
from qflux.models.flux2_klein.conditioning import encode_prompt
from qflux.models.flux2_klein.config import BUILTIN, Flux2KleinConfig
from qflux.models.flux2_klein.loaders import COMPONENTS, ENCODERS, PIPELINE
from qflux.models.flux2_klein.names import NAMES, NAMING
from qflux.models.flux2_klein.tiny import build_flux2_klein
from qflux.train.builtin import BuiltinModel, register_builtin_model
from qflux.train.family import Family
from qflux.weights.shapes import register_shapes

__all__ = ["FAMILY", "TINY", "encode_prompt"]

TINY = {"flux2_klein": build_flux2_klein}
"""``python -m qflux.tiny`` names → builder."""
register_builtin_model(
    BUILTIN, BuiltinModel(lambda _: "tiny-flux2-klein-seed0", lambda p, _: build_flux2_klein(p, seed=0))
)
register_naming(NAMING, NAMES)
register_shapes(Path(__file__).parent / "shapes")

FAMILY = Family(
    name="flux2_klein",
    pipeline=PIPELINE,
    config=Flux2KleinConfig,
    components=COMPONENTS,
    encoders=ENCODERS,
    naming=NAMING,
    tiny=TINY,
    reference="klein-",
)
"""What the recipe and the commands read of this family."""
