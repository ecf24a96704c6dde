"""The FLUX.1 Kontext embedding cache: what is cached per sample, under which key, and how it is read.

Entries (plan names), each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target bytes, size (w, h), crop box (buckets), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | control file bytes, resized size, crop box, resize mode, VAE identity |
| ``clip_prompt_embed`` | ``embed`` [P] | prompt text, CLIP + tokenizer identity |
| ``t5_prompt_embed`` | ``embed`` [S, D] | prompt text, T5 + tokenizer identity, ``max_sequence_length`` |
| ``change_mask`` | ``mask`` [1, h, w] | ``train.loss_mask``, target bytes, size, box; mask file or control, level |

The empty prompt (caption dropout, CFG) is cached as ordinary prompt entries for ``""``, and so is
``train.preserve_prompt``. An
identity is the component folder's resolved path, a hash of its config (and tokenizer files) and
the dtype. FLUX's prompt embeddings do not depend on the image, so the text is their whole input;
a model whose encoder sees the image must put the image digest into the prompt key.
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
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.models.flux_kontext.loaders import FluxKontextModels
from qflux.train.cache import (
    Entry,
    ImageSpec,
    Job,
    PromptSpec,
    read_config,
    read_for_training,
    read_mask,
)
from qflux.train.cache_path import fixed_prompts

PROMPT_KINDS = ("clip_prompt_embed", "t5_prompt_embed")


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings: identities and expected shapes.

    Built from the model folder's configs alone, so training from the cache loads no encoder.
    """

    images: ImageSpec
    clip: PromptSpec
    """The pooled CLIP embedding [P]."""
    t5: PromptSpec
    """The T5 tokens [S, D], S = ``max_sequence_length``."""
    max_sequence_length: int
    preserve_prompt: str | None = None
    """``train.preserve_prompt``: its entries are read beside the empty prompt's."""


def cache_spec(
    model_dir: Path,
    dtype: str,
    max_sequence_length: int,
    loss_mask: MaskMode = "none",
    preserve_prompt: str | None = None,
) -> CacheSpec:
    """Read identities and shapes from a (resolved) FLUX.1 Kontext folder."""
    clip_shape = (int(read_config(model_dir, "text_encoder")["hidden_size"]),)
    t5_shape = (max_sequence_length, int(read_config(model_dir, "text_encoder_2")["d_model"]))
    t5_folders, t5_settings = ("text_encoder_2", "tokenizer_2"), {"max_sequence_length": max_sequence_length}
    return CacheSpec(
        images=ImageSpec.from_folder(model_dir, dtype, "latent_channels", loss_mask),
        clip=PromptSpec.from_folder(model_dir, dtype, PROMPT_KINDS[0], ("text_encoder", "tokenizer"), clip_shape),
        t5=PromptSpec.from_folder(model_dir, dtype, PROMPT_KINDS[1], t5_folders, t5_shape, t5_settings),
        max_sequence_length=max_sequence_length,
        preserve_prompt=preserve_prompt,
    )


def prompt_entries(spec: CacheSpec, root: Path, text: str) -> tuple[Entry, Entry]:
    """The CLIP and T5 entries of a prompt."""
    return spec.clip.entry(root, text), spec.t5.entry(root, text)


def empty_entries(spec: CacheSpec, root: Path) -> tuple[Entry, ...]:
    """The entries every sample reads: those of :func:`~qflux.train.cache_path.fixed_prompts`."""
    return tuple(e for text in fixed_prompts(spec.preserve_prompt) for e in prompt_entries(spec, root, text))


@attrs.frozen
class SampleEntries:
    """The four entries one training sample reads."""

    target: Entry
    control: Entry
    clip: Entry
    t5: Entry
    mask: Entry | None = None
    """The change mask (``train.loss_mask``), or None."""

    def all(self) -> list[Entry]:
        return [self.target, self.control, self.clip, self.t5, *([self.mask] if self.mask else [])]


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        target, (control,), mask = spec.images.entries(root, s)
        out.append(SampleEntries(target, control, *prompt_entries(spec, root, s.prompt), mask=mask))
    return out


def jobs(models: FluxKontextModels, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need (and the empty prompt's), each with the function that computes it.

    Args:
        models: VAE, CLIP and T5 with tokenizers (no transformer needed).
    """
    last: dict[str, PromptEmbeds] = {}

    def embed(text: str) -> PromptEmbeds:  # CLIP and T5 jobs of one text are adjacent: encode once
        if text not in last:
            last.clear()
            last[text] = encode_prompt_with(models, [text], spec.max_sequence_length)
        return last[text]

    def pooled(text: str) -> dict[str, torch.Tensor]:
        return {"embed": embed(text).pooled[0]}

    def tokens(text: str) -> dict[str, torch.Tensor]:
        return {"embed": embed(text).tokens[0]}

    out: list[Job] = []
    texts = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        out += spec.images.jobs(s, (se.target, se.control), se.mask, partial(vae_encode, models.vae))
        texts.append((s.prompt, (se.clip, se.t5)))
    texts += [(text, prompt_entries(spec, root, text)) for text in fixed_prompts(spec.preserve_prompt)]
    for text, (clip, t5) in texts:
        out.append((clip, partial(pooled, text)))
        out.append((t5, partial(tokens, text)))
    return out


def read_preserve_prompt(spec: CacheSpec, root: Path) -> PromptEmbeds | None:
    """The cached preserve-prompt embeddings (as :func:`read_empty_prompt`), or None without one."""
    return None if spec.preserve_prompt is None else read_empty_prompt(spec, root, spec.preserve_prompt)


def read_empty_prompt(spec: CacheSpec, root: Path, text: str = "") -> PromptEmbeds:
    """The cached embeddings of the empty prompt (or of ``text``, one of :func:`~qflux.train.cache_path.fixed_prompts`),
    as a batch of one: pooled [1, P], tokens [1, S, D]."""
    clip, t5 = prompt_entries(spec, root, text)
    return PromptEmbeds(
        pooled=read_for_training(clip)["embed"][None],
        tokens=read_for_training(t5)["embed"][None],
    )


def read_sample(e: SampleEntries) -> dict[str, torch.Tensor]:
    """One cached sample's tensors: latent [C, h, w], control [C, hc, wc], pooled [P], tokens [S, D]
    and, with a change mask, mask [1, h, w]."""
    return {
        "latent": read_for_training(e.target)["latent"],
        "control": read_for_training(e.control)["latent"],
        "pooled": read_for_training(e.clip)["embed"],
        "tokens": read_for_training(e.t5)["embed"],
        **read_mask(e.mask),
    }


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], control [B, C, hc, wc], pooled, tokens."""
    out: dict[str, Any] = {"index": [it["index"] for it in items]}
    for k in ("latent", "control", "pooled", "tokens", "mask"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out
