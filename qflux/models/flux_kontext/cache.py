"""The FLUX.1 Kontext embedding cache: what is cached per sample, under which key, and how it is read.

Entries (plan names), each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target bytes, size (w, h), crop box (buckets), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | control file bytes, resized size, crop box, resize mode, VAE identity |
| ``clip_prompt_embed`` | ``embed`` [P] | prompt text, CLIP + tokenizer identity |
| ``t5_prompt_embed`` | ``embed`` [S, D] | prompt text, T5 + tokenizer identity, ``max_sequence_length`` |
| ``change_mask`` | ``mask`` [1, h, w] | ``train.loss_mask``, target bytes, size, box; mask file or control, level |

The empty prompt (caption dropout, CFG) is cached as ordinary prompt entries for ``""``. An
identity is the component folder's resolved path, a hash of its config (and tokenizer files) and
the dtype. FLUX's prompt embeddings do not depend on the image, so the text is their whole input;
a model whose encoder sees the image must put the image digest into the prompt key.
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
from qflux.diffusion.latents import vae_scale_factor
from qflux.models.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.models.flux_kontext.loaders import FluxKontextModels
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
    make_entry,
    mask_entry,
    mask_job,
    read_for_training,
)

PROMPT_KINDS = ("clip_prompt_embed", "t5_prompt_embed")


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings: identities and expected shapes.

    Built from the model folder's configs alone, so training from the cache loads no encoder.
    """

    latents: LatentSpec
    clip_id: dict[str, Any]
    t5_id: dict[str, Any]
    max_sequence_length: int
    pooled_dim: int
    t5_dim: int
    loss_mask: MaskMode = "none"
    """``train.loss_mask``: which ``change_mask`` entries the samples read."""


def cache_spec(model_dir: Path, dtype: str, max_sequence_length: int, loss_mask: MaskMode = "none") -> CacheSpec:
    """Read identities and shapes from a (resolved) FLUX.1 Kontext folder."""
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    clip_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    t5_cfg = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())

    def ident(*subs: str) -> dict[str, Any]:
        return {s: folder_identity(model_dir / s, None if s.startswith("tokenizer") else dtype) for s in subs}

    return CacheSpec(
        latents=LatentSpec(ident("vae"), int(vae_cfg["latent_channels"]), vae_scale_factor(vae_cfg)),
        clip_id=ident("text_encoder", "tokenizer"),
        t5_id=ident("text_encoder_2", "tokenizer_2"),
        max_sequence_length=max_sequence_length,
        pooled_dim=int(clip_cfg["hidden_size"]),
        t5_dim=int(t5_cfg["d_model"]),
        loss_mask=loss_mask,
    )


def _latent(spec: CacheSpec, root: Path, kind: str, image: tuple[Path, tuple[int, int], Box | None]) -> Entry:
    path, size, box = image
    return spec.latents.entry(root, kind, file_digest(path), size, box)


def prompt_entries(spec: CacheSpec, root: Path, text: str) -> tuple[Entry, Entry]:
    """The CLIP and T5 entries of a prompt."""
    clip_key = {"kind": "clip_prompt_embed", "text": text, "encoder": spec.clip_id}
    t5_key = {
        "kind": "t5_prompt_embed",
        "text": text,
        "encoder": spec.t5_id,
        "max_sequence_length": spec.max_sequence_length,
    }
    return (
        make_entry(root, clip_key, {"embed": (spec.pooled_dim,)}),
        make_entry(root, t5_key, {"embed": (spec.max_sequence_length, spec.t5_dim)}),
    )


@attrs.frozen
class SampleEntries:
    """The four entries one training sample reads."""

    target: Entry
    control: Entry
    clip: Entry
    t5: Entry
    mask: Entry | None = None
    """The change mask (``train.loss_mask``), or None."""


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        clip, t5 = prompt_entries(spec, root, s.prompt)
        target, control = s.images()
        out.append(
            SampleEntries(
                target=_latent(spec, root, "pixel_latent", target),
                control=_latent(spec, root, "control_latent", control),
                clip=clip,
                t5=t5,
                mask=mask_entry(spec.latents, root, s, spec.loss_mask),
            )
        )
    return out


def _jobs(models: FluxKontextModels, spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[Job]:
    """Every entry the samples need, each with the function that computes its tensors."""
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

    def latent(path: Path, size: tuple[int, int], box: Box | None) -> dict[str, torch.Tensor]:
        return {"latent": vae_encode(models.vae, load_sized(path, size, box))[0]}

    jobs: list[Job] = []
    texts = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        target, control = s.images()
        jobs.append((se.target, partial(latent, *target)))
        jobs.append((se.control, partial(latent, *control)))
        if se.mask is not None:
            jobs.append((se.mask, mask_job(s, spec.loss_mask, spec.latents.factor)))
        texts.append((s.prompt, (se.clip, se.t5)))
    texts.append(("", prompt_entries(spec, root, "")))
    for text, (clip, t5) in texts:
        jobs.append((clip, partial(pooled, text)))
        jobs.append((t5, partial(tokens, text)))
    return jobs


def fill_cache(
    spec: CacheSpec,
    models: FluxKontextModels,
    samples: Sequence[PairSample],
    root: Path,
    *,
    progress: Callable[[list[Job]], Iterable[Job]] = iter,
) -> CacheReport:
    """Compute every missing or corrupt entry for ``samples`` (and the empty prompt); reuse the rest.

    Args:
        models: VAE, CLIP and T5 with tokenizers (no transformer needed).
        progress: wraps the list of entries (e.g. ``tqdm``).
    """
    return fill_entries(_jobs(models, spec, root, samples), progress=progress)


def verify_cache(spec: CacheSpec, root: Path, entries: Sequence[SampleEntries]) -> list[str]:
    """Problems ('<path>: missing' or why it is corrupt) of the entries training would read."""
    empty = prompt_entries(spec, root, "")
    read = [x for se in entries for x in (se.target, se.control, se.clip, se.t5, se.mask) if x is not None]
    return entry_problems([*read, *empty])


def read_empty_prompt(spec: CacheSpec, root: Path) -> PromptEmbeds:
    """The cached empty-prompt embeddings, as a batch of one: pooled [1, P], tokens [1, S, D]."""
    clip, t5 = prompt_entries(spec, root, "")
    return PromptEmbeds(
        pooled=read_for_training(clip)["embed"][None],
        tokens=read_for_training(t5)["embed"][None],
    )


def read_sample(e: SampleEntries) -> dict[str, torch.Tensor]:
    """One cached sample's tensors: latent, control, pooled, tokens."""
    return {
        "latent": read_for_training(e.target)["latent"],
        "control": read_for_training(e.control)["latent"],
        "pooled": read_for_training(e.clip)["embed"],
        "tokens": read_for_training(e.t5)["embed"],
        **({} if e.mask is None else {"mask": read_for_training(e.mask)["mask"]}),
    }


def cached_dataset(entries: Sequence[SampleEntries]) -> EntryDataset:
    """Map-style dataset over cached samples (:func:`read_sample` of each)."""
    return EntryDataset(entries, read_sample)


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], control [B, C, hc, wc], pooled, tokens."""
    out: dict[str, Any] = {"index": [it["index"] for it in items]}
    for k in ("latent", "control", "pooled", "tokens", "mask"):
        if k in items[0]:
            out[k] = torch.stack([it[k] for it in items])
    return out
