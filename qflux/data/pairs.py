"""The paired folder dataset: scanning and checking the folder, and sizing each pair (exactly or into buckets);
images in and out are :mod:`qflux.data.images`, the torch dataset :mod:`qflux.data.dataset`.

Layout (paired by file stem)::

    DATASET/control_images/NAME.<png|jpg|jpeg|webp>   the image to edit
    DATASET/control_images/NAME_control_1.<ext>       more control images, for models that take
    DATASET/control_images/NAME_control_2.<ext>       several (Qwen-Image-Edit-Plus: up to 3)
    DATASET/training_images/NAME.<ext>                the edited result (the target)
    DATASET/training_images/NAME.txt                  the instruction

Images keep their aspect ratio: an image above ``max_pixels`` is scaled down, then each side is
floored to a multiple of the model's ``multiple`` (its VAE factor times the 2×2 packing, 16 for
FLUX.1: :func:`qflux.diffusion.latents.size_multiple`), as FluxKontextPipeline does.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import attrs
from PIL import Image

from qflux.config.errors import QfluxError
from qflux.data.buckets import MAX_CROP, Box, Size, bucket_area, bucket_sizes, nearest_bucket
from qflux.data.controls import ControlRule, ControlSizes, crop_box, fit_size
from qflux.data.images import image_size

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
TARGET, OWN = ControlSizes("target"), ControlSizes("own")
"""The two rules without a cap or a pipeline's formula."""
UPSCALE_WARNING = 2.0
"""Pairs whose target is scaled up more than this (per side) into its bucket are named in a warning."""


@attrs.frozen
class PairSample:
    """One (control image(s), target, instruction) sample and the sizes it trains at."""

    name: str
    controls: tuple[Path, ...]
    """The control images in order (NAME, NAME_control_1, NAME_control_2); empty for a sample
    without one (models that allow it)."""
    target: Path
    prompt: str
    control_sizes: tuple[tuple[int, int], ...]
    """(width, height) each control image is resized to."""
    target_size: tuple[int, int]
    """(width, height) the target image is resized to."""
    control_boxes: tuple[Box | None, ...] = ()
    """Per control image, the region of it (source pixels) resized to its size; None (or an empty
    tuple): the whole image."""
    target_box: Box | None = None
    """The region of the target (source pixels) resized to its size; None: the whole image."""
    mask: Path | None = None
    """``masks/NAME.*``: where the edit happens (white), the target's size; None: no mask file."""

    @property
    def control(self) -> Path:
        """The (first) control image."""
        return self.controls[0]

    @property
    def control_size(self) -> tuple[int, int]:
        """(width, height) of the (first) control image."""
        return self.control_sizes[0]

    @property
    def control_crops(self) -> tuple[Box | None, ...]:
        """Per control image, its crop box (None: the whole image)."""
        return self.control_boxes or (None,) * len(self.controls)

    def images(self) -> list[tuple[Path, tuple[int, int], Box | None]]:
        """(file, size, crop box) of the target, then of each control image."""
        return [
            (self.target, self.target_size, self.target_box),
            *zip(self.controls, self.control_sizes, self.control_crops, strict=True),
        ]


def _image_problem(path: Path, multiple: int) -> str | None:
    """Why an image cannot be trained on (unreadable, truncated, empty, a side under ``multiple``
    px), or None."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.load()
            w, h = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"cannot be decoded ({e})"
    if min(w, h) < multiple:
        return f"is {w}×{h} px; each side must be at least {multiple} px"
    return None


def _find_image(folder: Path, stem: str) -> list[Path]:
    """Image files of ``folder`` whose stem is exactly ``stem`` (any supported extension, any case)."""
    return [
        p for p in sorted(folder.glob(glob.escape(stem) + ".*")) if p.suffix.lower() in IMAGE_EXTS and p.stem == stem
    ]


_EXTRA_CONTROL = re.compile(r"^(?P<stem>.+)_control_(?P<index>[1-9])$")


@attrs.frozen
class PairRule:
    """A model's rule for its samples: how many control images each has, and how its pipeline sizes them."""

    controls: tuple[int, int] = (1, 1)
    """(fewest, most) control images per sample."""
    control: ControlRule = attrs.field(factory=ControlRule)
    """What ``data.control_size: model`` means (:mod:`qflux.data.controls`)."""


def scan_pairs(
    root: str | Path,
    max_pixels: int | None,
    *,
    multiple: int,
    skip_invalid: bool = False,
    warn: Callable[[str], None] = print,
    listing: Listing | None = None,
    controls: tuple[int, int] = (1, 1),
    buckets: Literal["auto", "exact"] = "exact",
    control: ControlSizes = TARGET,
) -> list[PairSample]:
    """List and check the dataset's samples (sorted by name) before any model loads.

    Every image is decoded once. The problems found are: a missing control or target image, a
    missing, empty or non-UTF-8 instruction, an unreadable, truncated or 0-byte image, an image
    under ``multiple`` px on a side, one stem with several image extensions, (several control images)
    numbered control images with a gap or beyond the model's maximum, and a ``masks/`` file that is
    unreadable, doubled or not its target's size.

    Args:
        multiple: image sides become multiples of this (the model's :func:`qflux.diffusion.latents.size_multiple`).
        listing: receives the whole list of names behind each grouped warning (``warn`` gets one line with
            the first few: :func:`grouped`).
        skip_invalid: drop the samples with problems (each reported through ``warn``) instead of
            failing; an empty result still fails.
        controls: (fewest, most) control images per sample. With most > 1, ``NAME_control_1``,
            ``NAME_control_2``, ... belong to sample NAME; with fewest = 0 a sample may have none.
        buckets: "exact" sizes each image to its own aspect (:func:`fit_size`); "auto" crops and
            resizes pairs into aspect-ratio buckets (:func:`bucketed`), so that pairs of different
            sizes batch together.
        control: how a control image is sized against its target (:mod:`qflux.data.controls`): "target"
            (FLUX.1 Kontext: like the target), "own" (Qwen-Image-Edit, FLUX.2 [klein]: its own aspect at the
            training area; a control of the target's size gets the target's geometry) or "keep" (its own size),
            and its area cap.

    Raises:
        QfluxError: naming every problem and its file, or an empty dataset.
    """
    root = Path(root)
    controls_dir, targets = _folders(root)
    fewest, most = controls
    image_stems = {p.stem for d in (controls_dir, targets) for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS}
    if most > 1:  # NAME_control_i belongs to NAME (when NAME is a sample)
        image_stems = {_base_stem(s, image_stems, targets) for s in image_stems}
    text_stems = {p.stem for p in targets.iterdir() if p.suffix == ".txt"}
    problems: list[str] = []
    samples: list[PairSample] = []
    for stem in sorted(image_stems | text_stems):
        found = _check_sample(root, stem, multiple, fewest, most)
        if isinstance(found, PairSample):
            samples.append(found)
        else:
            problems += found
    _report(root, problems, samples, skip_invalid=skip_invalid, warn=warn, listing=listing)
    if buckets == "auto":
        return bucketed(samples, max_pixels, multiple, control=control, warn=warn, listing=listing)
    return [exactly_sized(s, max_pixels, multiple, control) for s in samples]


def _report(
    root: Path,
    problems: list[str],
    samples: list[PairSample],
    *,
    skip_invalid: bool,
    warn: Callable[[str], None],
    listing: Listing | None = None,
) -> None:
    """Fail naming every problem (or, with ``skip_invalid``, warn of each), and fail on no samples."""
    if problems and not skip_invalid:
        raise QfluxError(
            f"dataset '{root}' has {len(problems)} problem(s) (set data.skip_invalid=true to train on the "
            "valid samples only):\n  " + "\n  ".join(problems)
        )
    if problems:
        warn_grouped(f"{len(problems)} invalid sample(s) skipped", problems, warn, listing)
    if not samples:
        raise QfluxError(f"dataset '{root}' holds no usable samples: training_images/ has no valid pairs")


def exactly_sized(sample: PairSample, max_pixels: int | None, multiple: int, control: ControlSizes = OWN) -> PairSample:
    """``sample`` with the target at its own aspect, scaled down to ``max_pixels`` and floored to ``multiple``
    (:func:`fit_size`), uncropped; each control as ``control`` says (:meth:`ControlSizes.size` at the target's area,
    at most ``max_pixels``, as the buckets' area is at most the largest target's), cropped only where it takes another
    aspect's size (``target``)."""
    target = image_size(sample.target)
    size = fit_size(*target, max_pixels, multiple)
    sizes, boxes = [], []
    for source in map(image_size, sample.controls):
        area = target[0] * target[1] if max_pixels is None else min(max_pixels, target[0] * target[1])  # never above it
        c = control.size(source, size, multiple, area=area, target_source=target)
        sizes.append(c)
        boxes.append(crop_box(source, c) if control.sizing == "target" and source != target else None)
    return attrs.evolve(sample, control_sizes=tuple(sizes), target_size=size, control_boxes=tuple(boxes))


def bucketed(
    samples: Sequence[PairSample],
    max_pixels: int | None,
    multiple: int,
    *,
    control: ControlSizes,
    warn: Callable[[str], None] = print,
    listing: Listing | None = None,
) -> list[PairSample]:
    """``samples`` with each target cropped and resized into its aspect bucket (:mod:`qflux.data.buckets`).

    Each control is sized as ``control`` says (:meth:`ControlSizes.size`: the target's bucket, its own aspect at
    the buckets' area, or its own size), scaled to cover that size and centre-cropped; a control of its target's
    size under "target" or "own" gets the target's crop and size (pixel alignment kept).
    """
    sources = [[image_size(p) for p in (*s.controls, s.target)] for s in samples]
    area = bucket_area(max_pixels, [src[-1] for src in sources])
    table = bucket_sizes(area, multiple)
    out, upscaled, alone = [], [], []
    bucket = partial(_bucket, multiple)
    for s, src in zip(samples, sources, strict=True):
        target, own = nearest_bucket(src[-1], table, area, multiple)
        if (scale := max(target[0] / src[-1][0], target[1] / src[-1][1])) > UPSCALE_WARNING:
            upscaled.append((scale, s.target))
        if own:
            (w, h), (tw, th) = src[-1], target
            alone.append(f"{s.name} ({w}×{h} → {tw}×{th})")
        sizes, boxes = [], []
        for size in src[:-1]:
            c = control.size(size, target, multiple, area=area, target_source=src[-1], bucket=bucket)
            sizes.append(c)
            boxes.append(crop_box(size, c))
        out.append(attrs.evolve(s, control_sizes=tuple(sizes), target_size=target, control_boxes=tuple(boxes),
                                target_box=crop_box(src[-1], target)))  # fmt: skip
    if alone:
        cause = (f"{len(alone)} pair(s) train in a bucket of their own (the nearest bucket, 1:4 … 4:1, would crop "
                 f"more than {MAX_CROP:.0%} of their area)")  # fmt: skip
        warn_grouped(cause, alone, warn, listing)
    if upscaled:
        scale, name = max(upscaled)
        warn(f"{len(upscaled)} pair(s) are upscaled more than {UPSCALE_WARNING:g}× to their bucket (the most: {name}, "
             f"×{scale:.1f}): the buckets' area is that of the largest target ({area} px) or data.max_pixels; "
             "set data.max_pixels lower, or data.buckets: exact")  # fmt: skip
    return out


SHOWN = 3
"""Names a grouped warning lists before it counts the rest."""


Listing = Callable[[str, Sequence[str]], None]
"""Receives (cause, every name) of a grouped warning."""


def _bucket(multiple: int, source: Size, area: int) -> Size:
    """The bucket of ``area`` nearest ``source``'s aspect."""
    return nearest_bucket(source, bucket_sizes(area, multiple), area, multiple)[0]


def warn_grouped(cause: str, names: Sequence[str], warn: Callable[[str], None], listing: Listing | None) -> None:
    """One line through ``warn`` (:func:`grouped`), and the whole list through ``listing`` when given."""
    warn(grouped(cause, names))
    if listing is not None:
        listing(cause, names)


def grouped(cause: str, names: Sequence[str]) -> str:
    """One line for a warning that repeats: its cause (with the count), then the first :data:`SHOWN` names
    (``12 pair(s) train in a bucket of their own (...): a_00, a_01, a_02, … (+9 more)``)."""
    more = f", … (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return f"{cause}: {', '.join(names[:SHOWN])}{more}"


def _folders(root: Path) -> tuple[Path, Path]:
    """(control_images/, training_images/) of a dataset folder, or the error that says what is missing."""
    if not root.is_dir():
        raise QfluxError(
            f"dataset '{root}' does not exist; set data.dataset_path to a folder with control_images/ and "
            "training_images/"
        )
    controls, targets = root / "control_images", root / "training_images"
    if not controls.is_dir() or not targets.is_dir():
        raise QfluxError(
            f"dataset '{root}' must contain control_images/ and training_images/ "
            "(NAME.png in both, plus training_images/NAME.txt with the instruction)"
        )
    return controls, targets


def _base_stem(stem: str, stems: set[str], targets: Path) -> str:
    """``NAME`` for an extra control image ``NAME_control_i`` of sample NAME, else ``stem``."""
    m = _EXTRA_CONTROL.match(stem)
    if m and (m["stem"] in stems or (targets / f"{m['stem']}.txt").is_file()):
        return m["stem"]
    return stem


def _check_sample(root: Path, stem: str, multiple: int, fewest: int = 1, most: int = 1) -> PairSample | list[str]:
    """The sample named ``stem`` with its ``fewest``..``most`` control images, or its problems."""
    controls, targets = root / "control_images", root / "training_images"
    names = [stem] + [f"{stem}_control_{i}" for i in range(1, most)]
    found_controls = [_find_image(controls, n) for n in names]
    target = _find_image(targets, stem)
    txt = targets / f"{stem}.txt"
    problems = []
    count = sum(1 for f in found_controls if f)
    if most > 1:
        first_gap = next((i for i, f in enumerate(found_controls) if not f), len(found_controls))
        if count > first_gap:
            problems.append(
                f"{controls / names[first_gap]}.<png|jpg|jpeg|webp>: missing; the control images of sample "
                f"'{stem}' must be numbered without gaps ({', '.join(names)})"
            )
        beyond = _find_image(controls, f"{stem}_control_{most}")
        if beyond:
            problems.append(f"{beyond[0]}: sample '{stem}' has more than {most} control images (the model's maximum)")
    checks = [(controls, found_controls[0])] if count or fewest else []  # fewest = 0: none is fine
    checks += [(targets, target), *((controls, f) for f in found_controls[1:] if f)]
    for folder, found in checks:
        if not found:
            problems.append(f"{folder / stem}.<png|jpg|jpeg|webp>: missing image for sample '{stem}'")
        elif len(found) > 1:
            problems.append(f"{found[0]}: sample '{stem}' has several images ({', '.join(p.name for p in found)})")
        else:
            bad = _image_problem(found[0], multiple)
            if bad:
                problems.append(f"{found[0]}: {bad}")
    mask, mask_problems = _mask(root, stem, target)
    prompt, prompt_problems = _instruction(txt)
    problems += mask_problems + prompt_problems
    if problems:
        return problems
    return PairSample(
        name=stem,
        controls=tuple(f[0] for f in found_controls if f),
        target=target[0],
        prompt=prompt,
        control_sizes=(),
        target_size=(0, 0),
        mask=mask,
    )


def _mask(root: Path, stem: str, target: list[Path]) -> tuple[Path | None, list[str]]:
    """``masks/<stem>.*`` (None when there is none) and its problems: several files, unreadable, or
    not its target's size."""
    found = _find_image(root / "masks", stem) if (root / "masks").is_dir() else []
    if len(found) > 1:
        return None, [f"{found[0]}: sample '{stem}' has several masks ({', '.join(p.name for p in found)})"]
    if not found or len(target) != 1:
        return (found[0] if found else None), []
    bad = _image_problem(found[0], 1)
    if bad:
        return None, [f"{found[0]}: {bad}"]
    (mw, mh), (tw, th) = image_size(found[0]), image_size(target[0])
    if (mw, mh) != (tw, th):
        return None, [f"{found[0]}: {mw}×{mh}, but its target is {tw}×{th}; a mask has its target's size"]
    return found[0], []


def _instruction(txt: Path) -> tuple[str, list[str]]:
    """The instruction in ``txt`` and its problems: missing, not UTF-8, or empty."""
    if not txt.is_file():
        return "", [f"{txt}: missing instruction file"]
    try:
        prompt = txt.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return "", [f"{txt}: not UTF-8 text; save it as UTF-8"]
    return prompt, ([] if prompt else [f"{txt}: the instruction is empty"])
