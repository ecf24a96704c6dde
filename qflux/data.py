"""The paired folder dataset: scanning, image decoding and sizing, and same-size batching.

Layout (paired by file stem)::

    DATASET/control_images/NAME.<png|jpg|jpeg|webp>   the image to edit
    DATASET/training_images/NAME.<ext>                the edited result (the target)
    DATASET/training_images/NAME.txt                  the instruction

Images keep their aspect ratio: an image above ``max_pixels`` is scaled down, then each side is
floored to a multiple of 16 (the VAE's ×8 times the 2×2 packing), as FluxKontextPipeline does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from PIL import Image, ImageOps

from qflux.errors import QfluxError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
MULTIPLE = 16
_EXIF_ORIENTATION = 0x0112


@attrs.frozen
class PairSample:
    """One (control, target, instruction) triple and the sizes it trains at."""

    name: str
    control: Path
    target: Path
    prompt: str
    control_size: tuple[int, int]
    """(width, height) the control image is resized to."""
    target_size: tuple[int, int]
    """(width, height) the target image is resized to."""


def fit_size(width: int, height: int, max_pixels: int | None, multiple: int = MULTIPLE) -> tuple[int, int]:
    """Scale (width, height) down to at most ``max_pixels`` keeping the aspect, then floor to ``multiple``.

    Returns:
        (w, h), each a positive multiple of ``multiple``.
    """
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = round(width * scale), round(height * scale)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after the EXIF orientation is applied; reads the header only."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    return w, h


def load_rgb(path: Path) -> Image.Image:
    """Decode an image as 8-bit RGB: EXIF rotation applied, transparency composited on white."""
    with Image.open(path) as raw:
        im: Image.Image = ImageOps.exif_transpose(raw)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        return im.convert("RGB")


def _find_image(folder: Path, stem: str) -> list[Path]:
    return [folder / (stem + ext) for ext in IMAGE_EXTS if (folder / (stem + ext)).is_file()]


def scan_pairs(root: str | Path, max_pixels: int | None) -> list[PairSample]:
    """List the dataset's samples, sorted by name, checking the layout.

    Raises:
        QfluxError: listing every problem found (missing folders, unpaired files, empty prompts).
    """
    root = Path(root)
    controls, targets = root / "control_images", root / "training_images"
    if not controls.is_dir() or not targets.is_dir():
        raise QfluxError(
            f"dataset '{root}' must contain control_images/ and training_images/ "
            "(NAME.png in both, plus training_images/NAME.txt with the instruction)"
        )
    stems = sorted({p.stem for p in targets.iterdir() if p.suffix.lower() in IMAGE_EXTS})
    problems: list[str] = []
    samples: list[PairSample] = []
    for stem in stems:
        target = _find_image(targets, stem)
        control = _find_image(controls, stem)
        txt = targets / f"{stem}.txt"
        if not control:
            problems.append(f"{targets / stem}: no control image control_images/{stem}.<png|jpg|jpeg|webp>")
            continue
        if not txt.is_file():
            problems.append(f"{txt}: missing instruction file")
            continue
        prompt = txt.read_text(encoding="utf-8").strip()
        if not prompt:
            problems.append(f"{txt}: the instruction is empty")
            continue
        samples.append(
            PairSample(
                name=stem,
                control=control[0],
                target=target[0],
                prompt=prompt,
                control_size=fit_size(*image_size(control[0]), max_pixels),
                target_size=fit_size(*image_size(target[0]), max_pixels),
            )
        )
    if problems:
        raise QfluxError(f"dataset '{root}' has {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    if not samples:
        raise QfluxError(f"dataset '{root}' holds no samples: training_images/ has no images")
    return samples


def image_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize (Lanczos) to ``size`` = (w, h) and map to [−1, 1] exactly as FluxKontextPipeline does.

    Returns:
        [1, 3, h, w] float32.
    """
    from diffusers.image_processor import VaeImageProcessor

    w, h = size
    proc = VaeImageProcessor(vae_scale_factor=MULTIPLE)
    tensor: torch.Tensor = proc.preprocess(proc.resize(image, h, w), h, w)
    # contiguous: the processor returns a channels-last view, and convolutions pick other kernels
    # (with other rounding) for it, which would make cached and freshly encoded latents differ
    return tensor.contiguous()


@attrs.frozen
class PairDataset:
    """Map-style dataset over samples: ``ds[i]`` decodes and sizes one pair."""

    samples: Sequence[PairSample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {
            "index": i,
            "prompt": s.prompt,
            "control": image_to_tensor(load_rgb(s.control), s.control_size)[0],
            "target": image_to_tensor(load_rgb(s.target), s.target_size)[0],
        }


def collate_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-size items: control [B, 3, hc, wc], target [B, 3, h, w], prompts, indices."""
    return {
        "index": [it["index"] for it in items],
        "prompt": [it["prompt"] for it in items],
        "control": torch.stack([it["control"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
    }


def epoch_batches(
    samples: Sequence[PairSample], batch_size: int, *, seed: int, epoch: int, shuffle: bool
) -> list[list[int]]:
    """Group sample indices into batches of equal (control, target) size; the order depends only on
    (seed, epoch). The last batch of a size group may be smaller.
    """
    rng = random.Random(f"{seed}/{epoch}")
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.control_size, s.target_size), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        if shuffle:
            rng.shuffle(idx)
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def batch_stream(
    dataset: Any,
    samples: Sequence[PairSample],
    batch_size: int,
    *,
    seed: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]] = collate_pairs,
) -> Iterator[dict[str, Any]]:
    """Endless stream of collated same-size batches of ``dataset``, epoch after epoch.

    Args:
        dataset: map-style, indexed like ``samples`` (images, or cached tensors).
        samples: give the sizes that batches are grouped by.
    """
    from torch.utils.data import DataLoader

    epoch = 0
    while True:
        batches = epoch_batches(samples, batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
        loader: DataLoader[Any] = DataLoader(
            dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_fn
        )
        yield from loader
        epoch += 1
