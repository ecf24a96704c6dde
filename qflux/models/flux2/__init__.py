"""FLUX.2: multi-reference image editing on the Flux2 transformer and VAE, in two variants that differ in their
prompt encoder: [klein] (Qwen3; 4B and 9B) and [dev] (Mistral Small 3.1; 32B, guidance-distilled). One folder,
two recipes: each variant is a family record of its own."""

from pathlib import Path

from qflux.models.flux2.config import BUILTIN, DEV_BUILTIN, Flux2DevConfig, Flux2KleinConfig
from qflux.models.flux2.loaders import COMPONENTS, DEV, ENCODERS, KLEIN
from qflux.models.flux2.names import NAMES, NAMING
from qflux.models.flux2.tiny import build_flux2_dev, build_flux2_klein
from qflux.train.builtin import BuiltinModel
from qflux.train.family import Family

__all__ = ["DEV_FAMILY", "KLEIN_FAMILY"]

_SHAPES = Path(__file__).parent / "shapes"

KLEIN_FAMILY = Family(name="flux2_klein", pipeline=KLEIN.pipeline, config=Flux2KleinConfig, reference="klein-",
                      components=COMPONENTS, encoders=ENCODERS, naming=NAMING, names=NAMES,
                      tiny={"flux2_klein": build_flux2_klein}, shapes=_SHAPES,
                      builtin=(BUILTIN, BuiltinModel.seed0("tiny-flux2-klein-seed0", build_flux2_klein)))  # fmt: skip
"""What the [klein] recipe and the commands read of it (registered by :mod:`qflux.models`)."""

DEV_FAMILY = Family(name="flux2_dev", pipeline=DEV.pipeline, config=Flux2DevConfig, reference="dev-",
                    components=COMPONENTS, encoders=ENCODERS, naming=NAMING, names=NAMES,
                    tiny={"flux2_dev": build_flux2_dev}, shapes=_SHAPES,
                    builtin=(DEV_BUILTIN, BuiltinModel.seed0("tiny-flux2-dev-seed0", build_flux2_dev)))  # fmt: skip
"""What the [dev] recipe and the commands read of it (registered by :mod:`qflux.models`)."""
