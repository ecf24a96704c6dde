"""The configuration: the shared sections of every recipe (schema), parsing YAML and ``--a.b=c`` at the edge,
the generated reference and the command line. A model family's own section is in its folder."""

from qflux.config.parse import load_config
from qflux.config.schema import LoraConfig, RecipeConfig

__all__ = ["LoraConfig", "RecipeConfig", "load_config"]
