"""Held-out validation samples (``validation`` config section), shared by the recipes.

A validation sample is a training-layout pair (from ``validation.dataset_path``) or a listed
``[control, prompt]`` / ``[control, prompt, target]``. Every sample is carried as a
:class:`~qflux.data.pairs.PairSample` so the training data path (encoding or the cache) serves it
unchanged; a sample listed without a target carries its control image in the target slot and
``has_target = False``, which keeps it out of the loss and the target panel.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from tqdm import tqdm

from qflux.config.errors import QfluxError
from qflux.config.schema import DataConfig, RecipeConfig, ValidationConfig
from qflux.data.dataset import PairDataset
from qflux.data.images import load_rgb, load_sized, to_pil
from qflux.data.masks import edit_psnr
from qflux.data.pairs import PairRule, PairSample, exactly_sized, scan_pairs
from qflux.train.batch import Conditioning, DataPath, Draws, Prepared, eval_batches, prepare
from qflux.train.builtin import BUILTIN_DATASETS, resolve_dataset_path
from qflux.train.loop import LoopState
from qflux.train.plots import save_image_grid
from qflux.train.state import LossFn, evaluate_loss
from qflux.train.tracking import Tracker


@attrs.frozen
class ValidationSet:
    """The samples a run validates on, in a fixed order."""

    samples: list[PairSample]
    has_target: list[bool]


def validation_set(cfg: ValidationConfig, data: DataConfig, *, multiple: int, rule: PairRule) -> ValidationSet:
    """Resolve and check the validation samples (before any model loads), sized like training's
    (sides multiples of ``multiple``: :func:`qflux.diffusion.latents.size_multiple`; ``data.max_pixels``, the
    control sizing of ``data.control_size`` under the model's ``rule``); a folder is read with the model's
    ``rule`` (how many control images a sample has).

    Raises:
        QfluxError: no source configured, or a listed sample that is malformed or unreadable.
    """
    max_pixels = data.max_pixels
    sizing = rule.control.resolve(data)
    if cfg.samples:
        samples, has_target = [], []
        for i, item in enumerate(cfg.samples[: cfg.num_validation_samples]):
            if len(item) not in (2, 3):
                raise QfluxError(
                    f"validation.samples[{i}] must be [control image, prompt] or [control image, prompt, "
                    f"target image]; got {list(item)}"
                )
            control = Path(item[0])
            target = Path(item[2]) if len(item) == 3 else control
            for p in (control, target):
                if not p.is_file():
                    raise QfluxError(f"validation.samples[{i}]: image '{p}' does not exist")
            sample = PairSample(f"sample{i}", (control,), target, item[1], (), (0, 0))
            samples.append(exactly_sized(sample, max_pixels, multiple, sizing))
            has_target.append(len(item) == 3)
        return ValidationSet(samples, has_target)
    if cfg.dataset_path is not None:
        root = Path(cfg.dataset_path)
    elif data.dataset_path in BUILTIN_DATASETS:  # a built-in dataset's own held-out set
        root = resolve_dataset_path(data.dataset_path, heldout=True)
    else:
        raise QfluxError(
            "validation.enabled is true but there are no validation samples: set validation.dataset_path to a "
            "folder in the training layout, or validation.samples to a list of [control, prompt(, target)]"
        )
    found = scan_pairs(root, max_pixels, multiple=multiple, controls=rule.controls,
                       control=sizing)[: cfg.num_validation_samples]  # fmt: skip
    return ValidationSet(found, [True] * len(found))


METRIC_GRID = 8
"""The change mask of the edit metrics is derived on a grid this many pixels coarse (then smoothed
and dilated by a cell, :func:`qflux.data.masks.change_mask`)."""


def validation_grid(
    vset: ValidationSet, predictions: Sequence[np.ndarray], path: str | Path,
    metrics: Sequence[tuple[float, float] | None] = (),
) -> np.ndarray:  # fmt: skip
    """Write one row per sample: its control image(s) (none for a text-only sample) | target (when it has
    one) | prediction, the prediction labelled with its edit metrics (``pred C|U dB``: :func:`edit_metrics`)
    when given.

    Args:
        predictions: [H, W, 3] float images in [0, 1], one per sample.
        metrics: per sample, (psnr_changed, psnr_unchanged) or None.

    Returns:
        The grid, [H, W, 3] uint8.
    """
    rows, labels = [], []
    notes = list(metrics) or [None] * len(predictions)
    for sample, has_target, pred, m in zip(vset.samples, vset.has_target, predictions, notes, strict=True):
        controls = [load_rgb(c) for c in sample.controls]
        panels = controls + ([load_rgb(sample.target)] if has_target else [])
        names = ["control"] if len(controls) == 1 else [f"control {i + 1}" for i in range(len(controls))]
        names += ["target"] if has_target else []
        rows.append([*panels, to_pil(pred)])
        labels.append([*names, "prediction" if m is None else f"pred {m[0]:.1f}|{m[1]:.1f} dB"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image_grid(rows, labels, path)


def validation_text(values: Mapping[str, float]) -> str:
    """``validation loss 0.1234, edit PSNR 21.3 dB where the pair changes, 30.1 dB where it does not``."""
    parts = [f"validation loss {values['val/loss']:.4f}"] if "val/loss" in values else []
    if "val/psnr_changed" in values and "val/psnr_unchanged" in values:
        parts.append(f"edit PSNR {values['val/psnr_changed']:.1f} dB where the pair changes, "
                     f"{values['val/psnr_unchanged']:.1f} dB where it does not")  # fmt: skip
    return ", ".join(parts)


@attrs.frozen(eq=False)
class EditReference:
    """What a validation prediction is held against: the pair at the target's size, in [0, 1]."""

    control: torch.Tensor
    """[3, H, W] the (first) control image, cropped and sized like the target."""
    target: torch.Tensor
    """[3, H, W]."""
    mask: torch.Tensor
    """[1, H, W] where the pair changes: its mask file, else derived (:mod:`qflux.data.masks`)."""


def edit_reference(sample: PairSample) -> EditReference:
    """The reference of a validation sample that has a target. A sample without a control image
    (Edit-Plus and FLUX.2 [klein] take 0) is all edit: its mask covers the whole image."""
    target = load_sized(sample.target, sample.target_size, sample.target_box)[0]
    if not sample.controls:
        return EditReference((target + 1) / 2, (target + 1) / 2, torch.ones_like(target[:1]))
    control = load_sized(sample.control, sample.target_size, sample.control_crops[0] if sample.control_crops else None)[
        0
    ]
    masks = PairDataset([sample], mask_mode="masks" if sample.mask else "auto", vae_factor=METRIC_GRID)
    grid = masks.mask(sample, [control], target)
    mask = torch.nn.functional.interpolate(grid[None], size=target.shape[-2:], mode="nearest")[0]
    return EditReference((control + 1) / 2, (target + 1) / 2, mask)


def edit_metrics(prediction: np.ndarray, ref: EditReference) -> tuple[float, float]:
    """(val/psnr_changed, val/psnr_unchanged) in dB of a prediction [h, w, 3] in [0, 1]: against
    the target inside the change mask, against the control outside it (preservation); the
    prediction is resized to the target's size first."""
    pred = torch.from_numpy(np.ascontiguousarray(prediction, dtype=np.float32)).permute(2, 0, 1)
    if pred.shape[-2:] != ref.target.shape[-2:]:
        pred = torch.nn.functional.interpolate(pred[None], size=ref.target.shape[-2:], mode="bilinear")[0]
    changed, unchanged = edit_psnr(pred.clamp(0, 1), ref.control, ref.target, ref.mask)
    return float(changed), float(unchanged)


def make_validator(
    cfg: RecipeConfig,
    vset: ValidationSet,
    data: DataPath,
    loss_fn: LossFn,
    to_batch: Callable[[Prepared], Any],
    render: Callable[[Sequence[Conditioning], Sequence[Mapping[str, torch.Tensor]]], list[np.ndarray]],
    tracker: Tracker,
    device: torch.device,
    scheduler_config: Any,
    is_main: bool,
) -> Callable[[LoopState], LoopState]:
    """Build ``validate(state) → state``: the validation loss (fixed σ and noise, no dropout) and a
    grid of predictions (every rank computes; rank 0 writes ``validation/step-NNNNNN.png``).

    The samples' conditioning comes through the training data path (the cache when it is on) and is
    encoded once, here.
    """
    dataset = data.make_dataset(vset.samples)
    conds = [data.to_conditioning(data.collate([dataset[i]])) for i in range(len(vset.samples))]
    with_target = [c for c, t in zip(conds, vset.has_target, strict=True) if t]
    quiet = Draws.from_config(cfg.data, cfg.train).without_dropout()

    def assemble(cond: Conditioning, keys: tuple[int, ...]) -> Any:
        return to_batch(prepare(quiet, scheduler_config, cond, data.empty, keys, device, preserve=data.preserve))

    batches = eval_batches(assemble, with_target, seed=cfg.seed)
    refs = [edit_reference(s) if t else None for s, t in zip(vset.samples, vset.has_target, strict=True)]
    out = Path(cfg.output_dir) / "validation"

    def validate(state: LoopState) -> LoopState:
        values = {}
        lora = state.train.ema if cfg.validation.use_ema and state.train.ema is not None else state.train.lora
        if batches:
            values["val/loss"] = evaluate_loss(loss_fn, lora, batches).item()
        images = render(conds, [lora] * len(conds))
        metrics = [None if r is None else edit_metrics(im, r) for im, r in zip(images, refs, strict=True)]
        for i, key in enumerate(("val/psnr_changed", "val/psnr_unchanged")):
            finite = [m[i] for m in metrics if m is not None and np.isfinite(m[i])]
            if finite:
                values[key] = float(np.mean(finite))
        if is_main:
            grid = validation_grid(vset, images, out / f"step-{state.step:06d}.png", metrics)
            tracker.image(state.step, "val/grid", grid)
            if values:
                tracker.scalars(state.step, values)
                tqdm.write(f"step {state.step}: {validation_text(values)}")
        return state

    return validate
