"""How a control image is sized against its target: ``data.control_size`` and ``data.control_max_pixels``.

Every size is (width, height) in pixels, each side a multiple of the model's ``multiple`` (its VAE
factor × 2: :func:`qflux.diffusion.latents.size_multiple`).

    target  the control takes its target's size (the target's bucket, or its exact size), scaled to cover
            it and centre-cropped: FLUX.1 Kontext's pipeline gives the output the control's size
    own     a size of the control's own aspect at the training area, by the pipeline's own formula
            (Qwen-Image-Edit: ``calculate_dimensions``; FLUX.2 [klein]: its own size, shrunk to the area) or,
            for a rule without one, the nearest bucket of its aspect
    keep    the file's own size, floored to the multiple (never scaled up)

``data.control_size: model`` is the family's rule (:class:`ControlRule`); ``data.control_max_pixels``
then caps a control's area (scaled down, aspect kept) under every rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import attrs

from qflux.config.data import DataConfig
from qflux.data.buckets import Box, Size, cover_box

Sizing = Literal["target", "own", "keep"]
OwnSize = Callable[[Size, int, int], Size]
"""(source size, area, multiple) → a size of the source's own aspect at about ``area`` pixels (a pipeline's rule)."""


@attrs.frozen
class ControlSizes:
    """How a run sizes its control images (:meth:`ControlRule.resolve`)."""

    sizing: Sizing = "target"
    """See the module docstring."""
    max_pixels: int | None = None
    """The largest area of a control image; None: no cap of its own."""
    own: OwnSize | None = None
    """The ``own`` rule's size at an area; None: the nearest bucket of its aspect (in buckets), else its own size
    scaled down to the area (:func:`fit_size`)."""

    def size(self, source: Size, target: Size, multiple: int, *, area: int | None = None,
             target_source: Size | None = None, bucket: Callable[[Size, int], Size] | None = None) -> Size:  # fmt: skip
        """The size a control image of ``source`` pixels trains (or predicts) at, beside a target (output) of
        ``target``, at most :attr:`max_pixels` (scaled down, aspect kept).

        Args:
            area: the training area ``own`` sizes at (None: :attr:`max_pixels`).
            target_source: the target file's size: a control of that size under ``target`` or ``own`` takes the
                target's geometry (pixel alignment kept).
            bucket: (source, area) → the nearest bucket of its aspect: ``own``'s default in buckets.
        """
        if self.sizing == "keep":
            return fit_size(*source, self.max_pixels, multiple)
        if self.sizing == "target" or source == target_source:
            return fit_size(*target, self.max_pixels, multiple)
        if self.own is None and bucket is not None and area is not None:
            return bucket(source, smaller(area, self.max_pixels) or area)
        return self.own_size(source, area, multiple)

    def at_output(self, source: Size, output: Size, multiple: int) -> tuple[Size, Box | None]:
        """(size, crop box) of a control image of ``source`` pixels beside an output of ``output``, at inference:
        :meth:`size`, cropped only where that takes another aspect than the image's own (as the pipelines,
        whose resize to a floored size stretches by under a multiple)."""
        size = self.size(source, output, multiple)
        if self.sizing == "own":
            natural = self.own_size(source, None, multiple)
        else:  # the image's own aspect
            natural = fit_size(*source, self.max_pixels, multiple)
        return size, (None if size == natural else crop_box(source, size))

    def own_size(self, source: Size, area: int | None, multiple: int) -> Size:
        """``source``'s ``own`` size at ``area`` (capped at :attr:`max_pixels`): the rule's, or its own size scaled
        down to the area (:func:`fit_size`)."""
        area = smaller(area, self.max_pixels)
        if self.own is None or area is None:
            return fit_size(*source, area, multiple)
        return self.own(source, area, multiple)


@attrs.frozen
class ControlRule:
    """A family's pipeline rule for its control images: what ``data.control_size: model`` means."""

    sizing: Sizing = "target"
    """How the pipeline sizes a control against its output (see the module docstring)."""
    max_pixels: int | None = None
    """The largest control area the pipeline uses (Qwen-Image-Edit and FLUX.2 [klein]: 1024²); None: no cap
    of its own."""
    own: OwnSize | None = None
    """The pipeline's size for a control at its own aspect and an area (Qwen-Image-Edit: ``calculate_dimensions``,
    FLUX.2 [klein]: its own size shrunk to the area); None: :class:`ControlSizes`' default."""

    def resolve(self, data: DataConfig) -> ControlSizes:
        """Training's sizing for ``data.control_size`` and ``data.control_max_pixels``: ``model`` is this rule with
        its own cap (the smaller of the two caps); ``target`` and ``keep`` take only the user's cap."""
        if data.control_size == "model":
            return ControlSizes(self.sizing, smaller(self.max_pixels, data.control_max_pixels), self.own)
        return ControlSizes(data.control_size, data.control_max_pixels)

    def at_inference(self, data: DataConfig) -> ControlSizes:
        """Predict's sizing: training's, where ``own`` is also capped at ``data.max_pixels`` (training's ``own``
        controls are at most the training area), so a LoRA trained at a smaller area predicts at it."""
        sizes = self.resolve(data)
        if sizes.sizing != "own":
            return sizes
        return attrs.evolve(sizes, max_pixels=smaller(sizes.max_pixels, data.max_pixels))


def smaller(a: int | None, b: int | None) -> int | None:
    """The smaller of two optional caps (None: no cap)."""
    caps = [c for c in (a, b) if c is not None]
    return min(caps) if caps else None


def fit_size(width: int, height: int, max_pixels: int | None, multiple: int) -> Size:
    """Scale (width, height) down to at most ``max_pixels`` keeping the aspect, then floor to ``multiple``.

    Returns:
        (w, h), each a positive multiple of ``multiple``.
    """
    if max_pixels is not None and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = round(width * scale), round(height * scale)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def crop_box(source: Size, size: Size) -> Box | None:
    """The crop of ``source`` that covers ``size`` (:func:`qflux.data.buckets.cover_box`); None when it is the
    whole image."""
    box = cover_box(source, size)
    return None if box == (0.0, 0.0, float(source[0]), float(source[1])) else box


def area_ratio(control: Size, target: Size) -> float:
    """How many times larger one of the two areas is than the other (≥ 1)."""
    a, b = control[0] * control[1], target[0] * target[1]
    return max(a, b) / min(a, b)
