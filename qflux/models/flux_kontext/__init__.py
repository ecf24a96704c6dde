"""FLUX.1 Kontext: its config, loaders, conditioning, the training loss, predict, cache, plan, ComfyUI names and
tiny builder."""

from pathlib import Path

from qflux.lora.formats import register_naming
from qflux.models.flux_kontext.conditioning import encode_prompt
from qflux.models.flux_kontext.config import BUILTIN, FluxKontextConfig
from qflux.models.flux_kontext.loaders import COMPONENTS, ENCODERS, PIPELINE
from qflux.models.flux_kontext.names import NAMES, NAMING
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.train.builtin import BuiltinModel, register_builtin_model
from qflux.train.family import Family
from qflux.weights.shapes import register_shapes

__all__ = ["FAMILY", "TINY", "encode_prompt"]

TINY = {"flux_kontext": build_flux_kontext}
"""``python -m qflux.tiny`` names → builder."""
register_builtin_model(
    BUILTIN, BuiltinModel(lambda _: "tiny-flux-kontext-seed0", lambda p, _: build_flux_kontext(p, seed=0))
)
register_naming(NAMING, NAMES)
# re-quantized copies of FLUX.1-Kontext-dev (recipes/configs/flux_kontext_fp4.yaml and _fp8.yaml): its shapes
register_shapes(
    Path(__file__).parent / "shapes",
    same={
        "eramth/flux-kontext-4bit-fp4": "black-forest-labs/FLUX.1-Kontext-dev",
        "AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers": "black-forest-labs/FLUX.1-Kontext-dev",
    },
)

FAMILY = Family(
    name="flux_kontext",
    pipeline=PIPELINE,
    config=FluxKontextConfig,
    components=COMPONENTS,
    encoders=ENCODERS,
    naming=NAMING,
    tiny=TINY,
    reference="",
)
"""What the recipe and the commands read of this family."""
