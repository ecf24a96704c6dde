"""The data section of a recipe (``data``): the paired dataset, its sizing and batching."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from qflux.config.validators import non_negative, positive, positive_or_none, probability

BUILTIN_SYNTHETIC_DATASET = "builtin:synthetic"
"""A name that stands for a dataset qflux builds itself, offline (each model family names its own tiny model)."""
ControlSize = Literal["model", "target", "keep"]
CONTROL_SIZES = ("model", "target", "keep")


@attrs.frozen
class DataConfig:
    """The paired dataset and batching."""

    dataset_path: str = BUILTIN_SYNTHETIC_DATASET
    """Folder with control_images/ and training_images/; 'builtin:toy-<edit>' writes 64 toy-world pairs of an edit
    (docs/toy_world.md), 'builtin:synthetic' a synthetic invert-the-colours set."""
    batch_size: int = attrs.field(default=2, validator=[v.instance_of(int), positive])
    """Samples per micro-batch; each batch holds pairs of one bucket (one set of sizes)."""
    caption_dropout_rate: float = attrs.field(default=0.05, validator=probability)
    """Probability that a sample's instruction is replaced by the empty prompt."""
    prompt_image_dropout_rate: float = attrs.field(default=0.05, validator=probability)
    """Probability that a sample's control latents are replaced by zeros."""
    max_pixels: int | None = attrs.field(default=1024 * 1024, validator=positive_or_none)
    """The largest training area: the buckets' area (or, with ``buckets: exact``, images larger than
    this are scaled down, aspect kept). Sides are then floored to the model's multiple (16 for FLUX.1)."""
    buckets: Literal["auto", "exact"] = attrs.field(default="auto", validator=v.in_(("auto", "exact")))
    """auto: each pair is scaled and centre-cropped (at most 10% of its area) into the bucket nearest
    its target's aspect (1:4 … 4:1 in steps of ×2^¼, area ``max_pixels`` or the largest target's if
    smaller), so pairs of different sizes fill batches; exact: every image at its own aspect, uncropped,
    batched only with pairs of identical sizes."""
    control_size: ControlSize = attrs.field(default="model", validator=v.in_(CONTROL_SIZES))
    """How each control image is sized against its target, in training and in predict alike: 'model' as the
    model's pipeline does (FLUX.1 Kontext: like the target; Qwen-Image-Edit and FLUX.2 [klein]: its own aspect at
    the training area, at most 1024² px); 'target' like the target's bucket (or exact size), cropped to it;
    'keep' the file's own size floored to the model's multiple, uncropped (docs/edit_aware_training.md)."""
    control_max_pixels: int | None = attrs.field(default=None, validator=positive_or_none)
    """The largest area of a control image (scaled down, aspect kept) under every control_size; null: the
    model's own cap (with 'keep': none)."""
    drop_last: bool = False
    """Drop each bucket's last batch of an epoch when it holds fewer than ``batch_size`` samples (every
    step then trains on a full batch)."""
    shuffle: bool = True
    """Shuffle batches each epoch (the order depends only on seed and epoch)."""
    num_workers: int = attrs.field(default=0, validator=non_negative)
    """DataLoader worker processes that decode and resize images."""
    skip_invalid: bool = False
    """Skip samples with problems (missing, unreadable or tiny images, bad instructions) with a
    warning, instead of stopping before training with the list of problems."""
