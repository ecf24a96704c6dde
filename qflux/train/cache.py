"""A content-addressed store of tensors: one safetensors file per entry, written atomically.

An entry's name is a hash of everything that determines its value (input bytes, preprocessing
settings, encoder identity and settings), so an edited file, a changed setting or another model
gives another name and is recomputed, while everything else is reused. Layout::

    <cache_dir>/<kind>/<digest[:2]>/<digest>.safetensors

Each file carries its key description in the safetensors metadata, for inspection.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qflux.config.errors import QfluxError
from qflux.data.buckets import Box
from qflux.data.dataset import MaskMode, PairDataset
from qflux.data.images import load_sized
from qflux.data.masks import CHANGE_LEVEL
from qflux.data.pairs import PairSample
from qflux.diffusion.latents import vae_scale_factor

Shapes = Mapping[str, tuple[int, ...]]
"""Expected tensor shapes by name; a dimension of -1 matches any size (a prompt's token count)."""
RESIZE_MODE = "lanczos-floor16"  # how images are sized before encoding (qflux.data.pairs)


class CorruptEntry(Exception):
    """A cache file that cannot be used: unreadable, truncated, or with unexpected tensors."""


def file_digest(path: str | Path) -> str:
    """blake2b-128 of a file's bytes (hex)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_key(parts: Mapping[str, Any]) -> str:
    """blake2b-128 (hex) of the canonical JSON of ``parts`` (everything that determines an entry)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def entry_path(root: str | Path, kind: str, digest: str) -> Path:
    """Where the entry ``digest`` of ``kind`` lives under ``root``."""
    return Path(root) / kind / digest[:2] / f"{digest}.safetensors"


def write_entry(path: Path, tensors: Mapping[str, torch.Tensor], description: Mapping[str, Any]) -> None:
    """Write tensors to ``path`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            tmp,
            metadata={"qflux_key": json.dumps(description, sort_keys=True, default=str)},
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _header(path: Path) -> dict[str, Any]:
    """The parsed safetensors header, checked against the file size (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptEntry(f"{path}: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CorruptEntry(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header: dict[str, Any] = json.loads(f.read(n))
        except ValueError as e:
            raise CorruptEntry(f"{path}: unreadable safetensors header ({e})") from None
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + data_end != size:
        raise CorruptEntry(f"{path}: truncated or padded ({size} bytes, header says {8 + n + data_end})")
    return header


def check_entry(path: Path, shapes: Shapes) -> str | None:
    """Cheap validity check from the header alone.

    Returns:
        None when the entry is present and holds exactly ``shapes``; otherwise 'missing' or the
        reason it is corrupt.
    """
    if not path.is_file():
        return "missing"
    try:
        header = _header(path)
    except (CorruptEntry, OSError) as e:
        return str(e)
    found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if found.keys() != shapes.keys() or not all(_fits(found[k], shapes[k]) for k in shapes):
        return f"{path}: holds {found}, expected {dict(shapes)}"
    return None


def _fits(found: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(found) == len(expected) and all(e in (-1, f) for f, e in zip(found, expected, strict=True))


def read_entry(path: Path, shapes: Shapes) -> dict[str, torch.Tensor]:
    """Load an entry, checking it holds exactly the expected tensor names and shapes.

    Raises:
        CorruptEntry: the file is missing, unreadable, truncated or holds other tensors.
    """
    problem = check_entry(path, shapes)
    if problem is not None:
        raise CorruptEntry(f"{path}: missing" if problem == "missing" else problem)
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in shapes}
    except Exception as e:  # safetensors raises its own error type for bad data
        raise CorruptEntry(f"{path}: {e}") from None


def folder_identity(folder: Path, dtype: str | None) -> dict[str, Any]:
    """A model component's identity: its resolved path, a hash of its config and tokenizer files,
    and the dtype it runs in (None for tokenizers and processors)."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in folder.iterdir() if p.suffix in (".json", ".txt", ".model")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"path": str(folder.resolve()), "config": h.hexdigest(), "dtype": dtype}


def components_id(model_dir: Path, dtype: str, weights: str, *files: str) -> dict[str, Any]:
    """The identity of the component folder ``weights`` (run in ``dtype``) and of the tokenizer or
    processor folders ``files`` that feed it (no dtype): :func:`folder_identity` of each, by name."""
    return {f: folder_identity(model_dir / f, dtype if f == weights else None) for f in (weights, *files)}


def read_config(model_dir: Path, component: str) -> dict[str, Any]:
    """The ``config.json`` of a (resolved) model folder's component."""
    return dict(json.loads((model_dir / component / "config.json").read_text()))


@attrs.frozen
class Entry:
    """One cache entry: its file, the tensors it must hold, and the key it is named by."""

    kind: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    key: dict[str, Any]


def make_entry(root: Path, key: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Entry:
    """The entry of ``key`` (whose ``kind`` names its folder) under ``root``."""
    return Entry(key["kind"], entry_path(root, key["kind"], content_key(key)), shapes, key)


@attrs.frozen
class LatentSpec:
    """How a model's VAE turns an image into a cached latent: the VAE's identity and geometry."""

    vae_id: dict[str, Any]
    channels: int
    factor: int
    """Pixels per latent along a side."""

    def shape(self, size: tuple[int, int]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image resized to ``size`` = (w, h)."""
        return self.channels, size[1] // self.factor, size[0] // self.factor

    def entry(self, root: Path, kind: str, digest: str, size: tuple[int, int], box: Box | None = None) -> Entry:
        """The ``pixel_latent`` / ``control_latent`` entry of an image file (by content digest)
        resized to ``size`` = (w, h), the region ``box`` = (left, top, right, bottom) of it when given
        (a bucket's crop; the key of an uncropped image has no box, as before buckets)."""
        key = {"kind": kind, "file": digest, "size": list(size), "resize": RESIZE_MODE, "vae": self.vae_id}
        if box is not None:
            key["box"] = [round(x, 4) for x in box]
        return make_entry(root, key, {"latent": self.shape(size)})


@attrs.frozen
class PromptSpec:
    """How a text encoder's prompt embeddings are cached: their kind, the encoder's identity, the
    settings that change its output, and the shape of ``embed``."""

    kind: str
    encoder: dict[str, Any]
    """:func:`components_id` of the encoder and its tokenizer (and processor)."""
    shape: tuple[int, ...]
    """Of ``embed``: [P] (pooled) or [S, D] (tokens; S = -1 when it varies with the input)."""
    settings: dict[str, Any] = attrs.Factory(dict)
    """Further key parts (the sequence length, the layers, a template variant)."""

    @classmethod
    def from_folder(cls, model_dir: Path, dtype: str, kind: str, folders: Sequence[str], shape: tuple[int, ...],
                    settings: dict[str, Any] | None = None) -> PromptSpec:  # fmt: skip
        """A model folder's encoder: ``folders`` are its own (run in ``dtype``), then its tokenizer's."""
        return cls(kind, components_id(model_dir, dtype, *folders), shape, settings or {})

    def entry(self, root: Path, text: str, **inputs: Any) -> Entry:
        """The entry of ``text`` with ``inputs``, what else the encoder sees (control images' digests)."""
        key = {"kind": self.kind, "text": text, **inputs, **self.settings, "encoder": self.encoder}
        return make_entry(root, key, {"embed": self.shape})


Encode = Callable[[torch.Tensor], torch.Tensor]  # a VAE's encoder: images [1, 3, H, W] in [−1, 1] → [1, C, H/f, W/f]


@attrs.frozen
class ImageSpec:
    """What a model caches of a sample's images: the latents of its target and control images, and
    the change mask ``train.loss_mask`` asks for."""

    latents: LatentSpec
    loss_mask: MaskMode = "none"
    """``train.loss_mask``: which ``change_mask`` entries the samples read."""

    @classmethod
    def from_folder(cls, model_dir: Path, dtype: str, channels_key: str, loss_mask: MaskMode) -> ImageSpec:
        """A model folder's VAE (channels: ``channels_key`` of vae/config.json) under ``train.loss_mask``."""
        vae = read_config(model_dir, "vae")
        latents = LatentSpec(components_id(model_dir, dtype, "vae"), int(vae[channels_key]), vae_scale_factor(vae))
        return cls(latents, loss_mask)

    def entries(self, root: Path, s: PairSample) -> tuple[Entry, tuple[Entry, ...], Entry | None]:
        """The ``pixel_latent`` entry of a sample's target, the ``control_latent`` entry of each of its
        control images (as sized and cropped for training) and its ``change_mask`` entry (None: no mask)."""
        target = self.latents.entry(root, "pixel_latent", file_digest(s.target), s.target_size, s.target_box)
        controls = tuple(
            self.latents.entry(root, "control_latent", file_digest(c), size, box)
            for c, size, box in zip(s.controls, s.control_sizes, s.control_crops, strict=True)
        )
        return target, controls, mask_entry(self.latents, root, s, self.loss_mask)

    def jobs(self, s: PairSample, images: Sequence[Entry], mask: Entry | None, encode: Encode) -> list[Job]:
        """The jobs of sample ``s``'s latent entries ``images`` (its target's, then each control's) and
        of its change mask ``mask``: each image sized and cropped as training reads it, then ``encode``d."""
        jobs: list[Job] = [(e, partial(_encode_file, encode, *im)) for e, im in zip(images, s.images(), strict=True)]
        if mask is not None:
            jobs.append((mask, mask_job(s, self.loss_mask, self.latents.factor)))
        return jobs


def _encode_file(encode: Encode, path: Path, size: tuple[int, int], box: Box | None) -> dict[str, torch.Tensor]:
    return {"latent": encode(load_sized(path, size, box))[0]}


def read_images(target: Entry, controls: Sequence[Entry], mask: Entry | None = None) -> dict[str, Any]:
    """A cached sample's target latent [C, h, w], control latents (a list of [C, hc, wc]) and, when it
    has one, change mask (:func:`read_mask`)."""
    return {
        "latent": read_for_training(target)["latent"],
        "controls": [read_for_training(c)["latent"] for c in controls],
        **read_mask(mask),
    }


def read_mask(mask: Entry | None) -> dict[str, torch.Tensor]:
    """``{"mask": [1, h, w]}`` from a sample's change mask entry; ``{}`` when it has none."""
    return {} if mask is None else {"mask": read_for_training(mask)["mask"]}


def stack_images(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Same-size cached items' latents stacked: ``latent`` [B, C, h, w], ``controls`` (one [B, C, hc_k,
    wc_k] per control image), the items' ``index`` list, and ``mask`` [B, 1, h, w] when they have one."""
    return {
        "index": [it["index"] for it in items],
        "latent": torch.stack([it["latent"] for it in items]),
        "controls": [torch.stack(group) for group in zip(*(it["controls"] for it in items), strict=True)],
        **({"mask": torch.stack([it["mask"] for it in items])} if "mask" in items[0] else {}),
    }


@attrs.frozen
class CacheReport:
    """What :func:`fill_entries` did."""

    computed: int
    reused: int
    replaced: list[str]
    """Reasons of the corrupt entries that were recomputed."""


Job = tuple[Entry, Callable[[], dict[str, torch.Tensor]]]


def fill_entries(jobs: Sequence[Job], *, progress: Callable[[list[Job]], Iterable[Job]] = iter) -> CacheReport:
    """Compute every missing or corrupt entry of ``jobs`` (entry, compute); reuse the rest.

    An entry listed by several jobs (a prompt or file shared by samples) is handled once, and
    counted once by the progress bar too (it sees the distinct entries).

    Args:
        progress: wraps the list of jobs (e.g. ``tqdm``).
    """
    computed = reused = 0
    replaced: list[str] = []
    distinct: dict[Path, Job] = {}
    for job in jobs:
        distinct.setdefault(job[0].path, job)
    for entry, compute in progress(list(distinct.values())):
        problem = check_entry(entry.path, entry.shapes)
        if problem is None:
            reused += 1
            continue
        if problem != "missing":
            replaced.append(problem)
        write_entry(entry.path, compute(), entry.key)
        computed += 1
    return CacheReport(computed=computed, reused=reused, replaced=replaced)


def entry_problems(entries: Iterable[Entry]) -> list[str]:
    """Problems ('<path>: missing' or why it is corrupt) of the entries training would read."""
    problems: dict[Path, str] = {}
    for e in entries:
        if e.path not in problems:
            p = check_entry(e.path, e.shapes)
            if p is not None:
                problems[e.path] = f"{e.path}: missing" if p == "missing" else p
    return list(problems.values())


def read_for_training(entry: Entry) -> dict[str, torch.Tensor]:
    """An entry's tensors; a missing or corrupt one stops training with the fix (rerun ``cache``)."""
    try:
        return read_entry(entry.path, entry.shapes)
    except CorruptEntry as e:
        raise QfluxError(
            f"cache entry unusable during training: {e}; rerun the cache command (it recomputes it), then train again"
        ) from None


@attrs.frozen
class EntryDataset:
    """Map-style dataset over samples' cache entries: ``ds[i]`` is ``{"index": i, **read(entries[i])}``,
    read by identity (never by position)."""

    entries: Sequence[Any]
    read: Callable[[Any], dict[str, Any]]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, **self.read(self.entries[i])}


def mask_entry(latents: LatentSpec, root: Path, s: PairSample, mode: str) -> Entry | None:
    """The ``change_mask`` entry of sample ``s`` (a :class:`qflux.data.pairs.PairSample`) under
    ``train.loss_mask`` = ``mode`` (None for ``none``): the mask [1, h, w] on the latent grid, keyed
    by the target's content and geometry and what the mask is made from (the mask file, or the first
    control image and the auto mask's level)."""
    if mode == "none":
        return None
    w, h = s.target_size
    key: dict[str, Any] = {"kind": "change_mask", "mode": mode, "factor": latents.factor}
    key |= {"target": file_digest(s.target), "size": list(s.target_size), "box": _box(s.target_box)}
    if mode == "masks":
        key["mask"] = None if s.mask is None else file_digest(s.mask)
    elif s.controls:
        key |= {"control": file_digest(s.control), "control_size": list(s.control_size), "level": CHANGE_LEVEL,
                "control_box": _box(s.control_crops[0])}  # fmt: skip
    return make_entry(root, key, {"mask": (1, h // latents.factor, w // latents.factor)})


def _box(box: tuple[float, ...] | None) -> list[float] | None:
    return None if box is None else [round(x, 4) for x in box]


def mask_job(s: PairSample, mode: MaskMode, factor: int) -> Callable[[], dict[str, torch.Tensor]]:
    """Computes the tensors of :func:`mask_entry` (as the uncached data path does)."""

    def compute() -> dict[str, torch.Tensor]:
        images = zip(s.controls, s.control_sizes, s.control_crops, strict=True)
        controls = [load_sized(c, size, box)[0] for c, size, box in images]
        target = load_sized(s.target, s.target_size, s.target_box)[0]
        return {"mask": PairDataset([s], mask_mode=mode, vae_factor=factor).mask(s, controls, target)}

    return compute
