"""The FLUX.2 [klein] embedding cache: what is cached per sample, under which key, and how it is read.

Entries, each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target bytes, size (w, h), crop box (buckets), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | each reference's bytes, size, crop box, resize mode, VAE identity |
| ``qwen3_prompt_embed`` | ``embed`` [L, 3D] | prompt text, Qwen3 + tokenizer identity, sequence length, layers |
| ``change_mask`` | ``mask`` [1, h, w] | ``train.loss_mask``, target bytes, size, box; mask file or control, level |

The prompt embedding does not see the images, so the text is its whole input (as FLUX.1's); the
empty prompt (caption dropout) is an ordinary entry for ``""``. Its positions (0, 0, 0, l) are not
stored: they follow from L.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.data.buckets import Box
from qflux.data.dataset import MaskMode
from qflux.data.images import load_sized
from qflux.data.pairs import PairSample
from qflux.models.flux2_klein.conditioning import TEXT_LAYERS, PromptEmbeds, encode_prompt, text_ids, vae_encode
from qflux.models.flux2_klein.loaders import Flux2KleinModels
from qflux.train.cache import (
    CacheReport,
    Entry,
    EntryDataset,
    Job,
    LatentSpec,
    entry_problems,
    fill_entries,
    folder_identity,
    latent_spec,
    make_entry,
    mask_entry,
    mask_job,
    read_for_training,
    read_images,
    stack_images,
)

PROMPT_KIND = "qwen3_prompt_embed"


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings (read from the folder's configs alone)."""

    latents: LatentSpec
    encoder_id: dict[str, Any]
    max_sequence_length: int
    embed_dim: int
    """3 × the Qwen3 width (three hidden-state layers, stacked)."""
    loss_mask: MaskMode = "none"


def cache_spec(model_dir: Path, dtype: str, max_sequence_length: int, loss_mask: MaskMode = "none") -> CacheSpec:
    """Read identities and shapes from a (resolved) FLUX.2 [klein] folder."""
    enc_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    return CacheSpec(
        latents=latent_spec(model_dir, dtype, "latent_channels"),
        encoder_id={
            "text_encoder": folder_identity(model_dir / "text_encoder", dtype),
            "tokenizer": folder_identity(model_dir / "tokenizer", None),
        },
        max_sequence_length=max_sequence_length,
        embed_dim=len(TEXT_LAYERS) * int(enc_cfg["hidden_size"]),
        loss_mask=loss_mask,
    )


def prompt_entry(spec: CacheSpec, root: Path, text: str) -> Entry:
    """The embedding entry of ``text``."""
    key = {"kind": PROMPT_KIND, "text": text, "encoder": spec.encoder_id,
           "max_sequence_length": spec.max_sequence_length, "layers": list(TEXT_LAYERS)}  # fmt: skip
    return make_entry(root, key, {"embed": (spec.max_sequence_length, spec.embed_dim)})


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
    return [
        SampleEntries(
            *spec.latents.sample_images(root, s),
            prompt=prompt_entry(spec, root, s.prompt),
            mask=mask_entry(spec.latents, root, s, spec.loss_mask),
        )
        for s in samples
    ]


def _jobs(models: Flux2KleinModels, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need (and the empty prompt's), each with the function that computes it."""

    def embed(text: str) -> dict[str, torch.Tensor]:
        return {
            "embed": encode_prompt(models.text_encoder, models.tokenizer, [text], spec.max_sequence_length).tokens[0]
        }

    def latent(path: Path, size: tuple[int, int], box: Box | None) -> dict[str, torch.Tensor]:
        return {"latent": vae_encode(models.vae, load_sized(path, size, box))[0]}

    jobs: list[Job] = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        for entry, image in zip((se.target, *se.controls), s.images(), strict=True):
            jobs.append((entry, partial(latent, *image)))
        jobs.append((se.prompt, partial(embed, s.prompt)))
        if se.mask is not None:
            jobs.append((se.mask, mask_job(s, spec.loss_mask, spec.latents.factor)))
    jobs.append((prompt_entry(spec, root, ""), partial(embed, "")))
    return jobs


def fill_cache(
    spec: CacheSpec,
    models: Flux2KleinModels,
    samples: Sequence[PairSample],
    root: Path,
    *,
    progress: Callable[[list[Job]], Iterable[Job]] = iter,
) -> CacheReport:
    """Compute every missing or corrupt entry for ``samples`` (and the empty prompt); reuse the rest.

    Args:
        models: the VAE and Qwen3 with its tokenizer (no transformer needed).
    """
    return fill_entries(_jobs(models, spec, root, samples), progress=progress)


def verify_cache(spec: CacheSpec, root: Path, entries: Sequence[SampleEntries]) -> list[str]:
    """Problems ('<path>: missing' or why it is corrupt) of the entries training would read."""
    return entry_problems([*(e for se in entries for e in se.all()), prompt_entry(spec, root, "")])


def read_empty_prompt(spec: CacheSpec, root: Path) -> PromptEmbeds:
    """The cached empty prompt as a batch of one: tokens [1, L, 3D] and their positions."""
    tokens = read_for_training(prompt_entry(spec, root, ""))["embed"][None]
    return PromptEmbeds(tokens=tokens, ids=text_ids(tokens))


def read_sample(e: SampleEntries) -> dict[str, Any]:
    """One cached sample's tensors: latent, controls, embed."""
    return {
        **read_images(e.target, e.controls),
        "embed": read_for_training(e.prompt)["embed"],
        **({} if e.mask is None else {"mask": read_for_training(e.mask)["mask"]}),
    }


def cached_dataset(entries: Sequence[SampleEntries]) -> EntryDataset:
    """Map-style dataset over cached samples (:func:`read_sample` of each)."""
    return EntryDataset(entries, read_sample)


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], controls (one [B, C, hc_k, wc_k] per
    reference), embed [B, L, 3D]."""
    return {**stack_images(items), "embed": torch.stack([it["embed"] for it in items])}
