"""Turning a micro-batch into a :class:`QwenImageEditBatch`: per-sample vision-language
conditioning, dropout and random draws.

Each sample's prompt is embedded with its own control image(s), prepared as the pipeline prepares
them (:func:`qflux.models.qwen_image_edit.predict.vl_image`), so the training conditioning equals what
predict computes for that control image. Caption dropout replaces a sample's instruction by the
empty one *with the same images* (its own cached embedding). The random draws and dropout are
:func:`qflux.train.batch.prepare`, shared with FLUX.1 Kontext.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image

from qflux.data.buckets import Box
from qflux.data.dataset import PairDataset, collate_pairs
from qflux.data.images import crop, load_rgb
from qflux.models.qwen_image_edit.conditioning import encode_prompt, vae_encode
from qflux.models.qwen_image_edit.loaders import QwenImageEditModels
from qflux.models.qwen_image_edit.loss import QwenImageEditBatch
from qflux.models.qwen_image_edit.predict import vl_image
from qflux.train.batch import Conditioning, Prepared, encode_pairs, pad_tokens, to_record


def vl_images(
    controls: Sequence[Path | Image.Image], variant: str, boxes: Sequence[Box | None] = ()
) -> list[Image.Image]:
    """The vision-language inputs of a sample's control images (decoded when given as paths), each
    cropped to its box first when given: the region the VAE latent of that control sees (buckets)."""
    # deferred: diffusers is a heavy import
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=1)  # only its PIL resize: sizes come from calculate_dimensions
    images = [c if isinstance(c, Image.Image) else load_rgb(c) for c in controls]
    crops = boxes or (None,) * len(images)
    return [vl_image(crop(im, box), variant, proc) for im, box in zip(images, crops, strict=True)]


@attrs.frozen
class QwenPairDataset:
    """:class:`qflux.data.dataset.PairDataset` plus each sample's vision-language control images."""

    pairs: PairDataset
    variant: str

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.pairs.samples[i]
        controls = [load_rgb(c) for c in s.controls]  # decoded once for both uses
        return {**self.pairs.item(i, controls), "vl": vl_images(controls, self.variant, s.control_crops)}


def collate_qwen_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`qflux.data.dataset.collate_pairs` plus ``vl``: per sample, its list of PIL images."""
    return {**collate_pairs(items), "vl": [it["vl"] for it in items]}


def stack_tokens(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample embeddings [S_i, D] → (embeds [B, max S, D] zero-padded, mask [B, max S] long)."""
    length = max(r.shape[0] for r in rows)
    embeds = torch.cat([pad_tokens(r[None], length) for r in rows])
    mask = torch.stack([(torch.arange(length) < r.shape[0]).long() for r in rows])
    return embeds, mask


@torch.no_grad()
def encode_sample_prompt(
    models: QwenImageEditModels, prompt: str, images: Sequence[Image.Image], variant: str
) -> torch.Tensor:
    """One sample's prompt embedding with its own vision-language images: [S, D] (encoder dtype)."""
    embeds, _ = encode_prompt(models.text_encoder, models.processor, [prompt], [list(images)], variant=variant)
    return embeds[0]


@torch.no_grad()
def encode_conditioning(
    models: QwenImageEditModels, raw: dict[str, Any], variant: str, preserve_prompt: str | None = None
) -> Conditioning:
    """Encode a collated batch (:func:`collate_qwen_pairs`) with the VAE and the Qwen2.5-VL encoder.

    Each sample is encoded on its own, with its own images, exactly as the cache encodes it, so
    training with and without the cache sees bit-identical conditioning; so is ``preserve_prompt``, if given.
    """
    n = len(raw["prompt"])
    rows = [encode_sample_prompt(models, raw["prompt"][i], raw["vl"][i], variant) for i in range(n)]
    empty = [encode_sample_prompt(models, "", raw["vl"][i], variant) for i in range(n)]
    cond = encode_pairs(partial(vae_encode, models.vae), raw, _named(stack_tokens(rows)), _named(stack_tokens(empty)))
    if preserve_prompt is None:
        return cond
    kept = [encode_sample_prompt(models, preserve_prompt, raw["vl"][i], variant) for i in range(n)]
    return attrs.evolve(cond, preserve=_named(stack_tokens(kept)))


def to_batch(p: Prepared) -> QwenImageEditBatch:
    """The Qwen-Image-Edit batch record of prepared tensors (:func:`qflux.train.batch.prepare`)."""
    return to_record(QwenImageEditBatch, p, controls=p.controls, embeds=p.text["embeds"], mask=p.text["mask"])


def cached_conditioning(raw: dict[str, Any]) -> Conditioning:
    """Conditioning from a collated cached batch (:func:`qflux.models.qwen_image_edit.cache.collate_cached`)."""
    return Conditioning(
        latents=raw["latent"], controls=tuple(raw["controls"]), text=_named(raw["embed"]), empty=_named(raw["empty"]),
        preserve=_named(raw["preserve"]) if "preserve" in raw else None,
    )  # fmt: skip


def _named(embeds_mask: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(embeds [B, S, D], mask [B, S]) as :class:`~qflux.train.batch.Conditioning` holds a prompt."""
    return dict(zip(("embeds", "mask"), embeds_mask, strict=True))
