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
images (caption dropout), and with ``train.preserve_prompt`` that prompt's with its images. S varies
with the prompt and the images; the embeddings are padded per batch with a mask
(:func:`qflux.models.qwen_image_edit.batch.stack_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.data.buckets import Box
from qflux.data.dataset import MaskMode
from qflux.data.pairs import PairSample
from qflux.models.qwen_image_edit.batch import encode_sample_prompt, stack_tokens, vl_images
from qflux.models.qwen_image_edit.conditioning import vae_encode
from qflux.models.qwen_image_edit.loaders import QwenImageEditModels
from qflux.models.qwen_image_edit.predict import CONDITION_AREA, PLUS_VL_AREA
from qflux.train.cache import (
    Entry,
    ImageSpec,
    Job,
    PromptSpec,
    file_digest,
    read_config,
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

    images: ImageSpec
    prompt: PromptSpec
    """Qwen2.5-VL's embedding [S, D] of the instruction with the control images (S varies)."""
    variant: str
    preserve_prompt: str | None = None
    """``train.preserve_prompt``: each sample also reads its embedding with the sample's images."""


def cache_spec(
    model_dir: Path, dtype: str, variant: str, loss_mask: MaskMode = "none", preserve_prompt: str | None = None
) -> CacheSpec:
    """Read identities and shapes from a (resolved) Qwen-Image-Edit folder."""
    enc_cfg = read_config(model_dir, "text_encoder")
    embed_dim = int(enc_cfg.get("hidden_size") or enc_cfg["text_config"]["hidden_size"])
    area = CONDITION_AREA if variant == "edit" else PLUS_VL_AREA
    settings = {"variant": variant, "vision_input": f"area {area}, multiple of 32, lanczos"}
    folders = ("text_encoder", "processor", "tokenizer")
    return CacheSpec(
        images=ImageSpec.from_folder(model_dir, dtype, "z_dim", loss_mask),
        prompt=PromptSpec.from_folder(model_dir, dtype, PROMPT_KIND, folders, (-1, embed_dim), settings),
        variant=variant,
        preserve_prompt=preserve_prompt,
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
    crops = [None if b is None else [round(x, 4) for x in b] for b in boxes]
    cropped = {"boxes": crops} if any(b is not None for b in boxes) else {}
    return spec.prompt.entry(root, text, images=list(image_digests), **cropped)


def empty_entries(spec: CacheSpec, root: Path) -> tuple[Entry, ...]:
    """None: each sample's empty instruction sees its images, so it is among the sample's own entries."""
    return ()


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
    preserve: Entry | None = None
    """The preserve prompt with the same images (``train.preserve_prompt``), or None."""

    def all(self) -> list[Entry]:
        return [self.target, *self.controls, self.prompt, self.empty, *([self.mask] if self.mask else []),
                *([self.preserve] if self.preserve else [])]  # fmt: skip


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        target, controls, mask = spec.images.entries(root, s)
        digests = [file_digest(c) for c in s.controls]
        prompt = prompt_entry(spec, root, s.prompt, digests, s.control_crops)
        empty = prompt_entry(spec, root, "", digests, s.control_crops)
        kept = spec.preserve_prompt
        preserve = None if kept is None else prompt_entry(spec, root, kept, digests, s.control_crops)
        out.append(SampleEntries(target, controls, prompt, empty, mask, preserve))
    return out


def jobs(models: QwenImageEditModels, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need, each with the function that computes its tensors.

    Args:
        models: the VAE and the Qwen2.5-VL encoder with its processor (no transformer needed).
    """
    last: dict[PairSample, list[Any]] = {}

    def vision(s: PairSample) -> list[Any]:  # a sample's two embedding jobs are adjacent
        if s not in last:
            last.clear()
            last[s] = vl_images(s.controls, spec.variant, s.control_crops)
        return last[s]

    def embed(text: str, s: PairSample) -> dict[str, torch.Tensor]:
        return {"embed": encode_sample_prompt(models, text, vision(s), spec.variant)}

    out: list[Job] = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        out += spec.images.jobs(s, (se.target, *se.controls), se.mask, partial(vae_encode, models.vae))
        out.append((se.prompt, partial(embed, s.prompt, s)))
        out.append((se.empty, partial(embed, "", s)))
        if se.preserve is not None and spec.preserve_prompt is not None:
            out.append((se.preserve, partial(embed, spec.preserve_prompt, s)))
    return out


def read_sample(e: SampleEntries) -> dict[str, Any]:
    """One cached sample's tensors: latent, controls, embed and the empty instruction's embed (and the
    change mask, when it has one)."""
    return {
        **read_images(e.target, e.controls, e.mask),
        "embed": read_for_training(e.prompt)["embed"],
        "empty": read_for_training(e.empty)["embed"],
        **({} if e.preserve is None else {"preserve": read_for_training(e.preserve)["embed"]}),
    }


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], controls (one [B, C, hc_k, wc_k] per
    control image), embeddings padded with masks."""
    return {
        **stack_images(items),
        "embed": stack_tokens([it["embed"] for it in items]),
        "empty": stack_tokens([it["empty"] for it in items]),
        **({"preserve": stack_tokens([it["preserve"] for it in items])} if "preserve" in items[0] else {}),
    }
