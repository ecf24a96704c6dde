"""FLUX.1 Kontext: its config, loaders, conditioning, the training loss, predict, cache, plan, ComfyUI names and
tiny builder."""

from pathlib import Path

from qflux.models.flux_kontext.conditioning import encode_prompt
from qflux.models.flux_kontext.config import BUILTIN, FluxKontextConfig
from qflux.models.flux_kontext.loaders import COMPONENTS, ENCODERS, FLUX_KONTEXT, PIPELINE
from qflux.models.flux_kontext.names import NAMES, NAMING
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.models.flux_kontext.toy import FOLDER, build_toy_start, toy_paths
from qflux.train.builtin import BuiltinModel
from qflux.train.family import Family, ToyModel

__all__ = ["FAMILY", "encode_prompt"]

FAMILY = Family(name="flux_kontext", pipeline=PIPELINE, config=FluxKontextConfig, reference="",
                components=COMPONENTS, encoders=ENCODERS, naming=NAMING, names=NAMES,
                tiny={"flux_kontext": build_flux_kontext}, shapes=Path(__file__).parent / "shapes",
                builtin=(BUILTIN, BuiltinModel.seed0("tiny-flux-kontext-seed0", build_flux_kontext)),
                # re-quantized copies of FLUX.1-Kontext-dev (recipes/configs/flux_kontext_fp4.yaml and _fp8.yaml)
                same_shapes=dict.fromkeys(("eramth/flux-kontext-4bit-fp4",
                                           "AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers"),
                                          "black-forest-labs/FLUX.1-Kontext-dev"),
                toy=ToyModel(build_toy_start, FLUX_KONTEXT, toy_paths, FOLDER))  # fmt: skip
"""What the recipe and the commands read of this family (registered by :mod:`qflux.models`)."""
