"""Turning a micro-batch into a :class:`Flux2Batch`: conditioning, dropout and random draws.

Each sample is encoded on its own (its prompt through the variant's text encoder, its target and reference
images through the VAE), as the cache encodes it; :func:`qflux.train.batch.prepare` then applies the keyed
draws and dropout shared with the other models. A dropped caption is the empty prompt; a dropped reference set
is zero latents.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from qflux.models.flux2.conditioning import PromptEmbeds, encode_prompt, text_ids, vae_encode
from qflux.models.flux2.loaders import Flux2Models
from qflux.models.flux2.loss import Flux2Batch
from qflux.models.flux2.text import TextEncoder
from qflux.train.batch import Conditioning, Prepared, cat_rows, encode_pairs, to_record


def text_tensors(embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
    """A prompt as :class:`~qflux.train.batch.Conditioning` holds it: tokens [B, L, 3D], ids [B, L, 4]."""
    return {"tokens": embeds.tokens, "ids": embeds.ids}


@torch.no_grad()
def encode_conditioning(
    encoder: TextEncoder, models: Flux2Models, raw: dict[str, Any], max_sequence_length: int
) -> Conditioning:
    """Encode a collated image batch (:func:`qflux.data.dataset.collate_pairs`) with the VAE and the text
    ``encoder``, one sample at a time."""
    encode = encoder, models.text_encoder, models.tokenizer
    text = cat_rows([text_tensors(encode_prompt(*encode, [p], max_sequence_length)) for p in raw["prompt"]])
    return encode_pairs(partial(vae_encode, models.vae), raw, text)


def cached_conditioning(raw: dict[str, Any]) -> Conditioning:
    """Conditioning from a collated cached batch (:func:`qflux.models.flux2.cache.collate_cached`)."""
    return Conditioning(
        latents=raw["latent"],
        controls=tuple(raw["controls"]),
        text={"tokens": raw["embed"], "ids": text_ids(raw["embed"])},
    )


def to_batch(p: Prepared) -> Flux2Batch:
    """The FLUX.2 batch record of prepared tensors (:func:`qflux.train.batch.prepare`)."""
    return to_record(Flux2Batch, p, references=p.controls, text=p.text["tokens"], text_ids=p.text["ids"])
