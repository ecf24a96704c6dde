"""Where a run's scalars and images go (``logging.report_to``): TensorBoard, a JSONL file, or nowhere.

An I/O edge: recipes call these with host numbers (already ``.item()``-ed at the logging cadence).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from qflux.config.errors import QfluxError


class Tracker(Protocol):
    """Receives scalars and images keyed by optimizer step."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """``image``: [H, W, 3] uint8."""

    def close(self) -> None: ...


class NullTracker:
    """``report_to: none``."""

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        pass

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlTracker:
    """``report_to: jsonl``: one ``{"step": s, "name": value, ...}`` line per call in metrics.jsonl
    (images are PNG files already; only their paths would go here, so they are skipped)."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / "metrics.jsonl"
        self._f = self.path.open("a", encoding="utf-8")

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        row = {"step": step, **{k: (None if not math.isfinite(v) else v) for k, v in values.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        self._f.close()


class TensorBoardTracker:
    """``report_to: tensorboard``: event files readable by TensorBoard (``tensorboard --logdir``)."""

    def __init__(self, logdir: Path) -> None:
        try:
            # deferred: tensorboard is a heavy import
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - tensorboard is a dependency
            raise QfluxError(
                "logging.report_to: tensorboard needs the tensorboard package (pip install tensorboard), "
                "or set logging.report_to: jsonl"
            ) from e
        self.writer = SummaryWriter(log_dir=str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tracker(report_to: str, logdir: str | Path) -> Tracker:
    """The tracker for ``logging.report_to`` writing under ``logdir``."""
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(logdir))
    if report_to == "jsonl":
        return JsonlTracker(Path(logdir))
    return NullTracker()
