"""Turning a micro-batch into a :class:`FluxKontextBatch`: conditioning, dropout and random draws.

Conditioning comes either from the encoders (:func:`encode_conditioning`) or from the cache
(:func:`cached_conditioning`); :func:`assemble_batch` then applies the same keyed draws to either,
so training with and without the cache sees identical batches. This all runs outside the gradient,
before ``train_step``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qflux.data.dataset import PairDataset, collate_pairs
from qflux.data.pairs import PairSample
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.models.flux_kontext.config import FluxKontextConfig
from qflux.models.flux_kontext.loaders import FluxKontextModels
from qflux.models.flux_kontext.loss import FluxKontextBatch
from qflux.train.batch import Conditioning, Draws, Prepared, prepare
from qflux.train.batch import eval_batches as shared_eval_batches


def text_tensors(embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
    """FLUX's prompt tensors as :class:`~qflux.train.batch.Conditioning` holds them: pooled [B, P],
    tokens [B, S, D]."""
    return {"pooled": embeds.pooled, "tokens": embeds.tokens}


@torch.no_grad()
def encode_conditioning(models: FluxKontextModels, raw: dict[str, Any], max_sequence_length: int) -> Conditioning:
    """Encode a collated image batch (:func:`qflux.data.dataset.collate_pairs`) with the VAE and text encoders.

    Each sample is encoded on its own, exactly as the cache encodes it, so training with and
    without the cache sees bit-identical conditioning.
    """
    n = len(raw["prompt"])
    embeds = [encode_prompt_with(models, [raw["prompt"][i]], max_sequence_length) for i in range(n)]
    return Conditioning(
        latents=torch.cat([vae_encode(models.vae, raw["target"][i : i + 1]) for i in range(n)]),
        controls=tuple(torch.cat([vae_encode(models.vae, x[i : i + 1]) for i in range(n)]) for x in raw["controls"]),
        text={"pooled": torch.cat([e.pooled for e in embeds]), "tokens": torch.cat([e.tokens for e in embeds])},
    )


def cached_conditioning(raw: dict[str, Any]) -> Conditioning:
    """Conditioning from a collated cached batch (:func:`qflux.models.flux_kontext.cache.collate_cached`)."""
    return Conditioning(
        latents=raw["latent"], controls=(raw["control"],), text={"pooled": raw["pooled"], "tokens": raw["tokens"]}
    )


@torch.no_grad()
def assemble_batch(
    draws: Draws,
    scheduler_config: Any,
    cond: Conditioning,
    empty: PromptEmbeds,
    keys: tuple[int, ...],
    device: torch.device | str = "cpu",
    first_index: int = 0,
) -> FluxKontextBatch:
    """Apply caption and control dropout, draw noise and σ (:func:`qflux.train.batch.prepare`), and
    move everything to ``device``.

    Dropped captions use the empty prompt's embeddings; dropped control images become zero latents.

    Args:
        empty: embeddings of the empty prompt, pooled [1, P] and tokens [1, S, D].
        keys: randomness keys (seed, step, micro-batch); sample i draws from keys + (first_index + i,).
        first_index: this batch's offset in the global batch (data-parallel ranks).
    """
    return to_batch(prepare(draws, scheduler_config, cond, text_tensors(empty), keys, device, first_index))


def to_batch(p: Prepared) -> FluxKontextBatch:
    """The FLUX.1 Kontext batch record of prepared tensors (:func:`qflux.train.batch.prepare`)."""
    return FluxKontextBatch(
        latents=p.latents,
        control_latents=p.controls[0],
        pooled=p.text["pooled"],
        prompt_embeds=p.text["tokens"],
        noise=p.noise,
        sigmas=p.sigmas,
        pixel=p.pixel,
    )


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
    seq = cfg.model.max_sequence_length
    empty = encode_prompt_with(models, [""], seq)
    conds = [encode_conditioning(models, collate_pairs([dataset[i]]), seq) for i in range(len(samples))]
    draws = Draws.from_config(cfg.data, cfg.train)
    return eval_batches(draws, models.scheduler.config, conds, empty, sigmas=sigmas, seed=seed)
