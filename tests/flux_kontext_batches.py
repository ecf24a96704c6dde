"""Test helpers: FLUX.1 Kontext batches built straight from images (the training path without the cache), and
fixed evaluation batches of held-out samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qflux.data.dataset import PairDataset, collate_pairs
from qflux.data.pairs import PairSample
from qflux.models.flux_kontext.batch import assemble_batch, encode_conditioning
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, text_length
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import FluxKontextModels
from qflux.models.flux_kontext.loss import FluxKontextBatch
from qflux.train.batch import Conditioning, Draws
from qflux.train.batch import eval_batches as shared_eval_batches
from qflux.train.builtin import resolve_model_path

TINY = ("--model.pretrained_model_name_or_path=builtin:tiny-flux-kontext", "--data.dataset_path=builtin:synthetic")
"""The tiny random FLUX.1 Kontext and the synthetic set, as command-line options: what the tests that are not
about the toy model run on (the FLUX.1 recipe's defaults are the toy model and its invert pairs, 8 per step,
with the auto loss mask)."""


def tiny_args(recipe: Any, data: bool = True) -> list[str]:
    """:data:`TINY` for the FLUX.1 Kontext recipe (without the dataset when ``data`` is false); nothing for the
    others, whose defaults are their tiny models."""
    if not recipe.__name__.endswith("flux_kontext_lora"):
        return []
    return list(TINY) if data else list(TINY[:1])


def build_batch(
    draws: Draws,
    models: FluxKontextModels,
    raw: dict[str, Any],
    keys: tuple[int, ...],
    *,
    max_sequence_length: int,
    device: torch.device | str = "cpu",
) -> FluxKontextBatch:
    """Encode a collated image batch and assemble it (the training path without the cache)."""
    empty = encode_prompt_with(models, [""], max_sequence_length)
    cond = encode_conditioning(models, raw, max_sequence_length)
    return assemble_batch(draws, models.scheduler.config, cond, empty, keys, device)


def eval_batches(
    draws: Draws,
    scheduler_config: Any,
    conds: Sequence[Conditioning],
    empty: PromptEmbeds,
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[FluxKontextBatch]:
    """:func:`qflux.train.batch.eval_batches` of FLUX.1 Kontext conditioning (no dropout)."""
    quiet = draws.without_dropout()
    return shared_eval_batches(
        lambda cond, keys: assemble_batch(quiet, scheduler_config, cond, empty, keys, device),
        conds,
        sigmas=sigmas,
        seed=seed,
    )


def fixed_eval_batches(
    cfg: FluxKontextConfig,
    models: FluxKontextModels,
    samples: Sequence[PairSample],
    *,
    sigmas: Sequence[float] = (0.25, 0.5, 0.75),
    seed: int = 0,
) -> list[FluxKontextBatch]:
    """:func:`eval_batches` of ``samples`` encoded with ``models`` (one at a time), with the
    configuration's draws and sequence length."""
    dataset = PairDataset(samples)
    seq = text_length(cfg.model.max_sequence_length, resolve_model_path(cfg.model.pretrained_model_name_or_path))
    empty = encode_prompt_with(models, [""], seq)
    conds = [encode_conditioning(models, collate_pairs([dataset[i]]), seq) for i in range(len(samples))]
    draws = Draws.from_config(cfg.data, cfg.train)
    return eval_batches(draws, models.scheduler.config, conds, empty, sigmas=sigmas, seed=seed)
