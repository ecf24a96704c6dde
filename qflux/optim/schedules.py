"""Learning-rate schedules as pure functions of the optimizer step (as diffusers' ``get_scheduler``).

The multiplier for the update that follows ``step`` completed updates:
    warmup:  step / warmup                                 for step < warmup
    constant: 1
    linear:   max(0, (total − step) / (total − warmup))
    cosine:   max(0, ½(1 + cos(2π·cycles·p))),  p = (step − warmup) / (total − warmup)
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleType = Literal["constant", "linear", "cosine"]


def lr_multiplier(
    step: int, *, kind: ScheduleType, warmup_steps: int, total_steps: int, num_cycles: float = 0.5
) -> float:
    """The factor applied to the base learning rate at ``step`` (0-based)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


def learning_rate(
    step: int,
    *,
    base_lr: float,
    kind: ScheduleType,
    warmup_steps: int,
    total_steps: int,
    num_cycles: float = 0.5,
) -> float:
    """lr(step) = base_lr · :func:`lr_multiplier`."""
    return base_lr * lr_multiplier(
        step, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps, num_cycles=num_cycles
    )
