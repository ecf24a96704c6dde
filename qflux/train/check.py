"""``python -m recipes.<model>_lora check [--config=F] [--data.dataset_path=DIR] [--section.key=value ...]``:
the dataset's errors (exit 2, as ``train`` gives them) and then its warnings (:mod:`qflux.data.checks`),
one line each naming the pair, and a summary line; exit 0 when there are only warnings."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tqdm import tqdm

from qflux.config.schema import RecipeConfig
from qflux.data.checks import check_pairs, summary
from qflux.data.pairs import PairRule
from qflux.diffusion.latents import size_multiple
from qflux.train.run import image_multiple, samples_at
from qflux.weights.shapes import published


def run_check(cfg: RecipeConfig, rule: PairRule, folder: Callable[[], Path]) -> int:
    """Check ``data.dataset_path`` for the configured model and print what was found.

    The image sides' multiple comes from the model's VAE config: qflux's shipped shapes for a
    supported hub id (nothing downloaded), else the model folder (``folder()``)."""
    shipped = published(cfg.model.pretrained_model_name_or_path)
    multiple = size_multiple(shipped["vae"]) if shipped and "vae" in shipped else image_multiple(folder())
    samples = samples_at(cfg, multiple, rule)
    lines = check_pairs(samples, progress=partial(tqdm, desc="checking pairs", unit="pair", leave=False))
    for line in lines:
        print(line)
    print(summary(len(samples), lines))
    return 0
