"""The FLUX.1 Kontext embedding cache: what is cached per sample, under which key, and how it is read.

Entries (plan names), each keyed by a content hash of everything that determines it:

| kind | tensor | key parts |
| --- | --- | --- |
| ``pixel_latent`` | ``latent`` [C, h, w] | target file bytes, resized (w, h), resize mode, VAE identity |
| ``control_latent`` | ``latent`` [C, hc, wc] | control file bytes, resized size, resize mode, VAE identity |
| ``clip_prompt_embed`` | ``embed`` [P] | prompt text, CLIP + tokenizer identity |
| ``t5_prompt_embed`` | ``embed`` [S, D] | prompt text, T5 + tokenizer identity, ``max_sequence_length`` |

The empty prompt (caption dropout, CFG) is cached as ordinary prompt entries for ``""``. An
identity is the component folder's resolved path, a hash of its config (and tokenizer files) and
the dtype. FLUX's prompt embeddings do not depend on the image, so the text is their whole input;
a model whose encoder sees the image must put the image digest into the prompt key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch

from qflux.cache import CorruptEntry, check_entry, content_key, entry_path, file_digest, read_entry, write_entry
from qflux.data import PairSample, image_to_tensor, load_rgb
from qflux.errors import QfluxError
from qflux.flux_kontext.conditioning import PromptEmbeds, encode_prompt_with, vae_encode
from qflux.flux_kontext.loaders import FluxKontextModels

RESIZE_MODE = "lanczos-floor16"  # how images are sized before encoding (qflux.data)
PROMPT_KINDS = ("clip_prompt_embed", "t5_prompt_embed")


def _folder_identity(folder: Path, dtype: str | None) -> dict[str, Any]:
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".txt", ".model")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"path": str(folder.resolve()), "config": h.hexdigest(), "dtype": dtype}


@attrs.frozen
class CacheSpec:
    """What the cache holds for one model and settings: identities and expected shapes.

    Built from the model folder's configs alone, so training from the cache loads no encoder.
    """

    vae_id: dict[str, Any]
    clip_id: dict[str, Any]
    t5_id: dict[str, Any]
    max_sequence_length: int
    latent_channels: int
    vae_factor: int
    pooled_dim: int
    t5_dim: int

    def latent_shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image resized to ``size`` = (w, h)."""
        return self.latent_channels, size[1] // self.vae_factor, size[0] // self.vae_factor


def cache_spec(model_dir: Path, dtype: str, max_sequence_length: int) -> CacheSpec:
    """Read identities and shapes from a (resolved) FLUX.1 Kontext folder."""
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    clip_cfg = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    t5_cfg = json.loads((model_dir / "text_encoder_2" / "config.json").read_text())

    def ident(*subs: str) -> dict[str, Any]:
        return {s: _folder_identity(model_dir / s, None if s.startswith("tokenizer") else dtype) for s in subs}

    return CacheSpec(
        vae_id=ident("vae"),
        clip_id=ident("text_encoder", "tokenizer"),
        t5_id=ident("text_encoder_2", "tokenizer_2"),
        max_sequence_length=max_sequence_length,
        latent_channels=int(vae_cfg["latent_channels"]),
        vae_factor=2 ** (len(vae_cfg["block_out_channels"]) - 1),
        pooled_dim=int(clip_cfg["hidden_size"]),
        t5_dim=int(t5_cfg["d_model"]),
    )


@attrs.frozen
class Entry:
    """One cache entry: its file and the tensors it must hold."""

    kind: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    key: dict[str, Any]


def latent_entry(spec: CacheSpec, root: Path, kind: str, digest: str, size: tuple[int, int]) -> Entry:
    """The ``pixel_latent`` / ``control_latent`` entry of an image file (by content digest) at ``size``."""
    key = {"kind": kind, "file": digest, "size": list(size), "resize": RESIZE_MODE, "vae": spec.vae_id}
    return Entry(kind, entry_path(root, kind, content_key(key)), {"latent": spec.latent_shape(size)}, key)


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
        Entry(
            "clip_prompt_embed",
            entry_path(root, "clip_prompt_embed", content_key(clip_key)),
            {"embed": (spec.pooled_dim,)},
            clip_key,
        ),
        Entry(
            "t5_prompt_embed",
            entry_path(root, "t5_prompt_embed", content_key(t5_key)),
            {"embed": (spec.max_sequence_length, spec.t5_dim)},
            t5_key,
        ),
    )


@attrs.frozen
class SampleEntries:
    """The four entries one training sample reads."""

    target: Entry
    control: Entry
    clip: Entry
    t5: Entry


def sample_entries(spec: CacheSpec, root: Path, samples: Sequence[PairSample]) -> list[SampleEntries]:
    """Entries of each sample; reads every image file once to hash its bytes."""
    out = []
    for s in samples:
        clip, t5 = prompt_entries(spec, root, s.prompt)
        out.append(
            SampleEntries(
                target=latent_entry(spec, root, "pixel_latent", file_digest(s.target), s.target_size),
                control=latent_entry(spec, root, "control_latent", file_digest(s.control), s.control_size),
                clip=clip,
                t5=t5,
            )
        )
    return out


@attrs.frozen
class CacheReport:
    """What :func:`fill_cache` did."""

    computed: int
    reused: int
    replaced: list[str]
    """Reasons of the corrupt entries that were recomputed."""


Job = tuple[Entry, Callable[[], dict[str, torch.Tensor]]]


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

    def latent(path: Path, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {"latent": vae_encode(models.vae, image_to_tensor(load_rgb(path), size))[0]}

    jobs: list[Job] = []
    texts = []
    for s, se in zip(samples, sample_entries(spec, root, samples), strict=True):
        jobs.append((se.target, partial(latent, s.target, s.target_size)))
        jobs.append((se.control, partial(latent, s.control, s.control_size)))
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
    computed = reused = 0
    replaced: list[str] = []
    seen: set[Path] = set()
    for entry, compute in progress(_jobs(models, spec, root, samples)):
        if entry.path in seen:  # shared by several samples (same prompt or same file)
            continue
        seen.add(entry.path)
        problem = check_entry(entry.path, entry.shapes)
        if problem is None:
            reused += 1
            continue
        if problem != "missing":
            replaced.append(problem)
        write_entry(entry.path, compute(), entry.key)
        computed += 1
    return CacheReport(computed=computed, reused=reused, replaced=replaced)


def verify_cache(spec: CacheSpec, root: Path, entries: Sequence[SampleEntries]) -> list[str]:
    """Problems ('<path>: missing' or why it is corrupt) of the entries training would read."""
    problems: dict[Path, str] = {}
    empty = prompt_entries(spec, root, "")
    for e in [*(x for se in entries for x in (se.target, se.control, se.clip, se.t5)), *empty]:
        if e.path not in problems:
            p = check_entry(e.path, e.shapes)
            if p is not None:
                problems[e.path] = f"{e.path}: missing" if p == "missing" else p
    return list(problems.values())


def read_empty_prompt(spec: CacheSpec, root: Path) -> PromptEmbeds:
    """The cached empty-prompt embeddings, as a batch of one: pooled [1, P], tokens [1, S, D]."""
    clip, t5 = prompt_entries(spec, root, "")
    return PromptEmbeds(
        pooled=_read(clip)["embed"][None],
        tokens=_read(t5)["embed"][None],
    )


def _read(entry: Entry) -> dict[str, torch.Tensor]:
    try:
        return read_entry(entry.path, entry.shapes)
    except CorruptEntry as e:
        raise QfluxError(
            f"cache entry unusable during training: {e}; rerun the cache command (it recomputes it), then train again"
        ) from None


@attrs.frozen
class CachedPairDataset:
    """Map-style dataset over cached samples: ``ds[i]`` reads sample i's entries by identity."""

    entries: Sequence[SampleEntries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        return {
            "index": i,
            "latent": _read(e.target)["latent"],
            "control": _read(e.control)["latent"],
            "pooled": _read(e.clip)["embed"],
            "tokens": _read(e.t5)["embed"],
        }


def collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size cached items: latent [B, C, h, w], control [B, C, hc, wc], pooled, tokens."""
    out: dict[str, Any] = {"index": [it["index"] for it in items]}
    for k in ("latent", "control", "pooled", "tokens"):
        out[k] = torch.stack([it[k] for it in items])
    return out
