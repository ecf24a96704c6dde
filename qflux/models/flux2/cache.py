"""The FLUX.2 embedding cache: what is cached per sample, under which key, and how it is read.

Entries, each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target bytes, size (w, h), crop box (buckets), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | each reference's bytes, size, crop box, resize mode, VAE identity |
| ``qwen3_prompt_embed``, ``mistral3_prompt_embed`` | ``embed`` [L, 3D] | prompt, encoder + tokenizer, length, layers |
| ``change_mask`` | ``mask`` [1, h, w] | ``train.loss_mask``, target bytes, size, box; mask file or control, level |

The prompt embedding does not see the images, so the text is its whole input (as FLUX.1's); the
empty prompt (caption dropout) is an ordinary entry for ``""``. Its positions (0, 0, 0, l) are not
stored: they follow from L.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.data.dataset import MaskMode
from qflux.data.pairs import PairSample
from qflux.models.flux2.conditioning import PromptEmbeds, encode_prompt, text_ids, vae_encode
from qflux.models.flux2.loaders import Flux2Models
from qflux.models.flux2.text import TextEncoder
from qflux.train.cache import (
    Entry,
    ImageSpec,
    Job,
    PromptSpec,
    read_config,
    read_for_training,
    read_images,
    stack_images,
)
from qflux.train.cache_path import fixed_prompts


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings (read from the folder's configs alone)."""

    images: ImageSpec
    prompt: PromptSpec
    """The text encoder's embedding [L, 3D]: three hidden-state layers stacked, L = ``max_sequence_length``."""
    encoder: TextEncoder
    """The variant's text encoder."""
    max_sequence_length: int
    preserve_prompt: str | None = None
    """``train.preserve_prompt``: its entry is read beside the empty prompt's."""


def cache_spec(
    encoder: TextEncoder,
    model_dir: Path,
    dtype: str,
    max_sequence_length: int,
    loss_mask: MaskMode = "none",
    preserve_prompt: str | None = None,
) -> CacheSpec:
    """Read identities and shapes from a (resolved) FLUX.2 folder whose text encoder is ``encoder``."""
    shape = (max_sequence_length, encoder.embed_width(read_config(model_dir, "text_encoder")))
    settings = {"max_sequence_length": max_sequence_length, "layers": list(encoder.layers)}
    return CacheSpec(
        images=ImageSpec.from_folder(model_dir, dtype, "latent_channels", loss_mask),
        prompt=PromptSpec.from_folder(model_dir, dtype, encoder.kind, ("text_encoder", "tokenizer"), shape, settings),
        encoder=encoder,
        max_sequence_length=max_sequence_length,
        preserve_prompt=preserve_prompt,
    )


def empty_entries(spec: CacheSpec, root: Path) -> tuple[Entry, ...]:
    """The entries every sample reads: those of :func:`~qflux.train.cache_path.fixed_prompts`."""
    return tuple(spec.prompt.entry(root, text) for text in fixed_prompts(spec.preserve_prompt))


@attrs.frozen
class SampleEntries:
    """The entries one training sample reads."""

    target: Entry
    controls: tuple[Entry, ...]
    prompt: Entry
    mask: Entry | None = None

    def all(self) -> list[Entry]:
        return [self.target, *self.controls, self.prompt, *([self.mask] if self.mask else [])]


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        target, controls, mask = spec.images.entries(root, s)
        out.append(SampleEntries(target, controls, spec.prompt.entry(root, s.prompt), mask))
    return out


def jobs(models: Flux2Models, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need (and the empty prompt's), each with the function that computes it.

    Args:
        models: the VAE and the text encoder with its tokenizer (no transformer needed).
    """
    encode = spec.encoder, models.text_encoder, models.tokenizer

    def embed(text: str) -> dict[str, torch.Tensor]:
        return {"embed": encode_prompt(*encode, [text], spec.max_sequence_length).tokens[0]}

    out: list[Job] = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        out += spec.images.jobs(s, (se.target, *se.controls), se.mask, partial(vae_encode, models.vae))
        out.append((se.prompt, partial(embed, s.prompt)))
    out += [
        (e, partial(embed, text))
        for text, e in zip(fixed_prompts(spec.preserve_prompt), empty_entries(spec, root), strict=True)
    ]
    return out


def read_preserve_prompt(spec: CacheSpec, root: Path) -> PromptEmbeds | None:
    """The cached preserve prompt (as :func:`read_empty_prompt`), or None without one."""
    return None if spec.preserve_prompt is None else read_empty_prompt(spec, root, spec.preserve_prompt)


def read_empty_prompt(spec: CacheSpec, root: Path, text: str = "") -> PromptEmbeds:
    """The cached empty prompt (or ``text``, one of :func:`~qflux.train.cache_path.fixed_prompts`) as a batch of one:
    tokens [1, L, 3D] and their positions."""
    tokens = read_for_training(spec.prompt.entry(root, text))["embed"][None]
    return PromptEmbeds(tokens=tokens, ids=text_ids(tokens))


def read_sample(e: SampleEntries) -> dict[str, Any]:
    """One cached sample's tensors: latent, controls, embed (and the change mask, when it has one)."""
    return {**read_images(e.target, e.controls, e.mask), "embed": read_for_training(e.prompt)["embed"]}


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], controls (one [B, C, hc_k, wc_k] per
    reference), embed [B, L, 3D]."""
    return {**stack_images(items), "embed": torch.stack([it["embed"] for it in items])}
