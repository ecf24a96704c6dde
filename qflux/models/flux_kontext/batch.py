"""Turning a micro-batch into a :class:`FluxKontextBatch`: conditioning, dropout and random draws.

Conditioning comes either from the encoders (:func:`encode_conditioning`) or from the cache
(:func:`cached_conditioning`); :func:`assemble_batch` then applies the same keyed draws to either,
so training with and without the cache sees identical batches. This all runs outside the gradient,
before ``train_step``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.models.flux_kontext.loaders import FluxKontextModels
from qflux.models.flux_kontext.loss import FluxKontextBatch
from qflux.train.batch import Conditioning, Draws, Prepared, cat_rows, encode_pairs, prepare, to_record


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
    text = cat_rows([text_tensors(encode_prompt_with(models, [p], max_sequence_length)) for p in raw["prompt"]])
    return encode_pairs(partial(vae_encode, models.vae), raw, text)


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
    return to_record(
        FluxKontextBatch, p, control_latents=p.controls[0], pooled=p.text["pooled"], prompt_embeds=p.text["tokens"]
    )
