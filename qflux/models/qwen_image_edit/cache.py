"""The Qwen-Image-Edit embedding cache: what is cached per sample, under which key, and how it is read.

Entries, each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target bytes, size (w, h), crop box (buckets), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | each control's bytes, size, crop box, resize mode, VAE identity |
| ``qwen_prompt_embed`` | ``embed`` [S, D] | prompt text, **every control image's bytes** and crop box, the |
| | | variant (template and vision-language resize), Qwen2.5-VL + processor + tokenizer identity |

Qwen-Image-Edit's prompt embedding sees the control image(s), so a prompt shared by two samples
with different images gives two entries; the processor's settings (pixel bounds, patch and merge
size) are part of its identity. Each sample also has the entry of the empty instruction with its
images (caption dropout). S varies with the prompt and the images; the embeddings are padded per
batch with a mask (:func:`qflux.models.qwen_image_edit.batch.stack_tokens`).
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
from qflux.models.qwen_image_edit.batch import encode_sample_prompt, stack_tokens, vl_images
from qflux.models.qwen_image_edit.conditioning import vae_encode
from qflux.models.qwen_image_edit.loaders import QwenImageEditModels
from qflux.models.qwen_image_edit.predict import CONDITION_AREA, PLUS_VL_AREA
from qflux.train.cache import (
    CacheReport,
    Entry,
    EntryDataset,
    Job,
    LatentSpec,
    entry_problems,
    file_digest,
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

PROMPT_KIND = "qwen_prompt_embed"


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings: identities and expected shapes.

    Built from the model folder's configs alone, so training from the cache loads no encoder.
    """

    latents: LatentSpec
    encoder_id: dict[str, Any]
    variant: str
    embed_dim: int
    loss_mask: MaskMode = "none"
    """``train.loss_mask``: which ``change_mask`` entries the samples read."""


def cache_spec(model_dir: Path, dtype: str, variant: str, loss_mask: MaskMode = "none") -> CacheSpec:
    """Read identities and shapes from a (resolved) Qwen-Image-Edit folder."""
    enc_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    return CacheSpec(
        latents=latent_spec(model_dir, dtype, "z_dim"),
        encoder_id={
            "text_encoder": folder_identity(model_dir / "text_encoder", dtype),
            "processor": folder_identity(model_dir / "processor", None),
            "tokenizer": folder_identity(model_dir / "tokenizer", None),
        },
        variant=variant,
        embed_dim=int(enc_cfg.get("hidden_size") or enc_cfg["text_config"]["hidden_size"]),
        loss_mask=loss_mask,
    )


def prompt_entry(
    spec: CacheSpec,
    root: Path,
    text: str,
    image_digests: Sequence[str],
    boxes: Sequence[Box | None] = (),
) -> Entry:
    """The embedding of ``text`` with the control images of these content digests, in order, each
    cropped to its box first (buckets; the key of uncropped images has no boxes, as before buckets)."""
    area = CONDITION_AREA if spec.variant == "edit" else PLUS_VL_AREA
    key: dict[str, Any] = {
        "kind": PROMPT_KIND,
        "text": text,
        "images": list(image_digests),
        "variant": spec.variant,
        "vision_input": f"area {area}, multiple of 32, lanczos",
        "encoder": spec.encoder_id,
    }
    if any(b is not None for b in boxes):
        key["boxes"] = [None if b is None else [round(x, 4) for x in b] for b in boxes]
    return make_entry(root, key, {"embed": (-1, spec.embed_dim)})


@attrs.frozen
class SampleEntries:
    """The entries one training sample reads."""

    target: Entry
    controls: tuple[Entry, ...]
    prompt: Entry
    empty: Entry
    """The empty instruction with the same images (caption dropout)."""
    mask: Entry | None = None
    """The change mask (``train.loss_mask``), or None."""

    def all(self) -> list[Entry]:
        return [self.target, *self.controls, self.prompt, self.empty, *([self.mask] if self.mask else [])]


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        digests = [file_digest(c) for c in s.controls]
        out.append(
            SampleEntries(
                *spec.latents.sample_images(root, s),
                prompt=prompt_entry(spec, root, s.prompt, digests, s.control_crops),
                empty=prompt_entry(spec, root, "", digests, s.control_crops),
                mask=mask_entry(spec.latents, root, s, spec.loss_mask),
            )
        )
    return out


def _jobs(models: QwenImageEditModels, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need, each with the function that computes its tensors."""

    last: dict[PairSample, list[Any]] = {}

    def vision(s: PairSample) -> list[Any]:  # a sample's two embedding jobs are adjacent
        if s not in last:
            last.clear()
            last[s] = vl_images(s.controls, spec.variant, s.control_crops)
        return last[s]

    def embed(text: str, s: PairSample) -> dict[str, torch.Tensor]:
        return {"embed": encode_sample_prompt(models, text, vision(s), spec.variant)}

    def latent(path: Path, size: tuple[int, int], box: Box | None) -> dict[str, torch.Tensor]:
        return {"latent": vae_encode(models.vae, load_sized(path, size, box))[0]}

    jobs: list[Job] = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        for entry, image in zip((se.target, *se.controls), s.images(), strict=True):
            jobs.append((entry, partial(latent, *image)))
        jobs.append((se.prompt, partial(embed, s.prompt, s)))
        jobs.append((se.empty, partial(embed, "", s)))
        if se.mask is not None:
            jobs.append((se.mask, mask_job(s, spec.loss_mask, spec.latents.factor)))
    return jobs


def fill_cache(
    spec: CacheSpec,
    models: QwenImageEditModels,
    samples: Sequence[PairSample],
    root: Path,
    *,
    progress: Callable[[list[Job]], Iterable[Job]] = iter,
) -> CacheReport:
    """Compute every missing or corrupt entry for ``samples``; reuse the rest.

    Args:
        models: the VAE and the Qwen2.5-VL encoder with its processor (no transformer needed).
        progress: wraps the list of entries (e.g. ``tqdm``).
    """
    return fill_entries(_jobs(models, spec, root, samples), progress=progress)


def verify_cache(spec: CacheSpec, root: Path, entries: Sequence[SampleEntries]) -> list[str]:
    """Problems ('<path>: missing' or why it is corrupt) of the entries training would read."""
    return entry_problems([e for se in entries for e in se.all()])


def read_sample(e: SampleEntries) -> dict[str, Any]:
    """One cached sample's tensors: latent, controls, embed and the empty instruction's embed."""
    return {
        **read_images(e.target, e.controls),
        "embed": read_for_training(e.prompt)["embed"],
        "empty": read_for_training(e.empty)["embed"],
        **({} if e.mask is None else {"mask": read_for_training(e.mask)["mask"]}),
    }


def cached_dataset(entries: Sequence[SampleEntries]) -> EntryDataset:
    """Map-style dataset over cached samples (:func:`read_sample` of each)."""
    return EntryDataset(entries, read_sample)


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], controls (one [B, C, hc_k, wc_k] per
    control image), embeddings padded with masks."""
    return {
        **stack_images(items),
        "embed": stack_tokens([it["embed"] for it in items]),
        "empty": stack_tokens([it["empty"] for it in items]),
    }
