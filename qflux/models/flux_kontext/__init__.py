"""FLUX.1 Kontext: its config, loaders, conditioning, the training loss, predict, cache, plan, ComfyUI names and
tiny builder."""

from qflux.lora.formats import register_naming
from qflux.models.flux_kontext.config import BUILTIN
from qflux.models.flux_kontext.names import NAMES, NAMING
from qflux.models.flux_kontext.tiny import build_flux_kontext
from qflux.train.builtin import BuiltinModel, register_builtin_model

__all__ = ["TINY"]

TINY = {"flux_kontext": build_flux_kontext}
"""``python -m qflux.tiny`` names → builder."""
register_builtin_model(
    BUILTIN, BuiltinModel(lambda _: "tiny-flux-kontext-seed0", lambda p, _: build_flux_kontext(p, seed=0))
)
register_naming(NAMING, NAMES)
