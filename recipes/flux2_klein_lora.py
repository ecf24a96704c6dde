"""FLUX.2 [klein] LoRA: ``python -m recipes.flux2_klein_lora [train|cache|predict|plan|check] [--config=F] [...]``.

With no arguments it trains on the built-in default (a tiny random FLUX.2 [klein] and the synthetic
colour-inversion dataset); ``Flux2KleinPipeline.load_lora_weights`` reads the LoRA it writes. The commands
are FLUX.2's (:mod:`recipes.flux2`), for [klein]: Qwen3, CFG in predict.
"""

from functools import partial

from recipes import flux2
from recipes.flux2 import PAIRS

__all__ = ["FAMILY", "PAIRS", "cache", "main", "predict", "train"]

RECIPE = flux2.KLEIN_RECIPE
FAMILY = RECIPE.family
train = partial(flux2.train, RECIPE)
cache = partial(flux2.cache, RECIPE)
predict = flux2.predict_command(RECIPE)
main = partial(flux2.main, RECIPE)
_plan_target = partial(flux2._plan_target, RECIPE)

if __name__ == "__main__":
    main()
