"""FLUX.2 [dev] LoRA: ``python -m recipes.flux2_dev_lora [train|cache|predict|plan|check] [--config=F] [...]``.

With no arguments it trains on the built-in default (a tiny random FLUX.2 [dev] and the synthetic
colour-inversion dataset); ``Flux2Pipeline.load_lora_weights`` reads the LoRA it writes. The commands are
FLUX.2's (:mod:`recipes.flux2`), for [dev]: Mistral Small 3.1, the guidance-distilled transformer at
``model.guidance_scale``. ``recipes/configs/flux2_dev_24gb.yaml`` and ``flux2_dev_48gb.yaml`` fit the real
32B model on those cards (``plan`` shows how).
"""

from functools import partial

from recipes import flux2
from recipes.flux2 import PAIRS

__all__ = ["FAMILY", "PAIRS", "cache", "main", "predict", "train"]

SPEC = flux2.DEV_SPEC
FAMILY = SPEC.family
train = partial(flux2.train, SPEC)
cache = partial(flux2.cache, SPEC)
predict = flux2.predict_command(SPEC)
main = partial(flux2.main, SPEC)
_plan_target = partial(flux2._plan_target, SPEC)

if __name__ == "__main__":
    main()
