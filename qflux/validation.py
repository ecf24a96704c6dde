"""Held-out validation samples (``validation`` config section), shared by the recipes.

A validation sample is a training-layout pair (from ``validation.dataset_path``) or a listed
``[control, prompt]`` / ``[control, prompt, target]``. Every sample is carried as a
:class:`~qflux.data.PairSample` so the training data path (encoding or the cache) serves it
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

from qflux.batching import Conditioning, DataPath, Draws, Prepared, eval_batches, prepare
from qflux.builtin import BUILTIN_SYNTHETIC_DATASET, resolve_dataset_path
from qflux.config import RecipeConfig, ValidationConfig
from qflux.data import PairSample, fit_size, load_rgb, scan_pairs, to_pil
from qflux.errors import QfluxError
from qflux.loop import LoopState
from qflux.plots import save_image_grid
from qflux.tracking import Tracker
from qflux.train_state import LossFn, evaluate_loss


@attrs.frozen
class ValidationSet:
    """The samples a run validates on, in a fixed order."""

    samples: list[PairSample]
    has_target: list[bool]


def validation_set(
    cfg: ValidationConfig, train_dataset_path: str, max_pixels: int | None, *, multiple: int
) -> ValidationSet:
    """Resolve and check the validation samples (before any model loads), sized like training's
    (sides multiples of ``multiple``: :func:`qflux.latents.size_multiple`).

    Raises:
        QfluxError: no source configured, or a listed sample that is malformed or unreadable.
    """
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
            sizes = []
            for p in (control, target):
                if not p.is_file():
                    raise QfluxError(f"validation.samples[{i}]: image '{p}' does not exist")
                im = load_rgb(p)
                sizes.append(fit_size(im.width, im.height, max_pixels, multiple))
            samples.append(PairSample(f"sample{i}", (control,), target, item[1], (sizes[0],), sizes[1]))
            has_target.append(len(item) == 3)
        return ValidationSet(samples, has_target)
    if cfg.dataset_path is not None:
        root = Path(cfg.dataset_path)
    elif train_dataset_path == BUILTIN_SYNTHETIC_DATASET:
        root = resolve_dataset_path(BUILTIN_SYNTHETIC_DATASET, heldout=True)
    else:
        raise QfluxError(
            "validation.enabled is true but there are no validation samples: set validation.dataset_path to a "
            "folder in the training layout, or validation.samples to a list of [control, prompt(, target)]"
        )
    found = scan_pairs(root, max_pixels, multiple=multiple)[: cfg.num_validation_samples]
    return ValidationSet(found, [True] * len(found))


def validation_grid(vset: ValidationSet, predictions: Sequence[np.ndarray], path: str | Path) -> np.ndarray:
    """Write one row per sample: control | target (when it has one) | prediction.

    Args:
        predictions: [H, W, 3] float images in [0, 1], one per sample.

    Returns:
        The grid, [H, W, 3] uint8.
    """
    rows, labels = [], []
    for sample, has_target, pred in zip(vset.samples, vset.has_target, predictions, strict=True):
        panels = [load_rgb(sample.control)] + ([load_rgb(sample.target)] if has_target else [])
        names = ["control"] + (["target"] if has_target else [])
        rows.append([*panels, to_pil(pred)])
        labels.append([*names, "prediction"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return save_image_grid(rows, labels, path)


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
        return to_batch(prepare(quiet, scheduler_config, cond, data.empty, keys, device))

    batches = eval_batches(assemble, with_target, seed=cfg.seed)
    out = Path(cfg.output_dir) / "validation"

    def validate(state: LoopState) -> LoopState:
        values = {}
        if batches:
            values["val/loss"] = evaluate_loss(loss_fn, state.train.lora, batches).item()
        images = render(conds, [state.train.lora] * len(conds))
        if is_main:
            grid = validation_grid(vset, images, out / f"step-{state.step:06d}.png")
            tracker.image(state.step, "val/grid", grid)
            if values:
                tracker.scalars(state.step, values)
                tqdm.write(f"step {state.step}: validation loss {values['val/loss']:.4f}")
        return state

    return validate
