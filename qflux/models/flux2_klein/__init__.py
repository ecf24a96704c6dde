"""FLUX.2 [klein]: multi-reference image editing (Qwen3 text encoder, Flux2 transformer and VAE)."""

from pathlib import Path

from qflux.models.flux2_klein.conditioning import encode_prompt
from qflux.models.flux2_klein.config import BUILTIN, Flux2KleinConfig
from qflux.models.flux2_klein.loaders import COMPONENTS, ENCODERS, PIPELINE
from qflux.models.flux2_klein.names import NAMES, NAMING
from qflux.models.flux2_klein.tiny import build_flux2_klein
from qflux.train.builtin import BuiltinModel
from qflux.train.family import Family

__all__ = ["FAMILY", "encode_prompt"]

FAMILY = Family(name="flux2_klein", pipeline=PIPELINE, config=Flux2KleinConfig, reference="klein-",
                components=COMPONENTS, encoders=ENCODERS, naming=NAMING, names=NAMES,
                tiny={"flux2_klein": build_flux2_klein}, shapes=Path(__file__).parent / "shapes",
                builtin=(BUILTIN, BuiltinModel.seed0("tiny-flux2-klein-seed0", build_flux2_klein)))  # fmt: skip
"""What the recipe and the commands read of this family (registered by :mod:`qflux.models`)."""
