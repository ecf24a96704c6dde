"""The training loop as explicit state: a :class:`LoopState` in, a new one out, one optimizer step at a time.

``LoopState`` is everything a run would lose on a crash: the train state (step, LoRA, optimizer
moments, seed), the data position, the non-finite counters and the loss history. Checkpoints save
and restore all of it (:mod:`qflux.train.checkpoint`). Per step, :func:`advance` records the step's
metrics as device tensors (no host sync); :func:`flush` reads the pending ones in one sync at the
log cadence. Side effects (the progress bar, logging, validation, checkpoints) are hooks: ``(every,
fn)`` pairs that :func:`run_loop` calls after the steps they are due, each taking and returning the
state; none closes over a changing local.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch

from qflux.train.state import TrainState

Metrics = Mapping[str, torch.Tensor]


@attrs.frozen(eq=False)
class LoopState:
    """A training run between two optimizer steps."""

    train: TrainState
    """Step, LoRA tensors, optimizer moments and the seed that keys every draw."""
    position: tuple[int, int]
    """(epoch, batch index) of the next batch."""
    streak: torch.Tensor
    """0-d: steps in a row, up to now, whose loss or gradient was not finite (their update skipped)."""
    worst: torch.Tensor
    """0-d: the longest such run so far."""
    skipped: torch.Tensor
    """0-d: all skipped steps so far."""
    losses: tuple[float, ...] = ()
    """Mean loss of every step read so far (:func:`flush`), earlier runs of a resumed run included."""
    pending: tuple[Metrics, ...] = ()
    """Metrics of the steps since the last :func:`flush`, as device tensors."""

    @property
    def step(self) -> int:
        """Optimizer steps completed."""
        return self.train.step


def start_state(
    train: TrainState,
    *,
    position: tuple[int, int] = (0, 0),
    losses: Sequence[float] = (),
    skipped: int = 0,
    streak: int = 0,
    worst: int = 0,
) -> LoopState:
    """A loop state on the LoRA's device (fresh, or from a checkpoint's counters)."""
    device = next(iter(train.lora.values())).device

    def scalar(x: int) -> torch.Tensor:
        return torch.tensor(float(x), device=device)

    epoch, batch = position
    return LoopState(train, (int(epoch), int(batch)), scalar(streak), scalar(worst), scalar(skipped), tuple(losses))


def advance(state: LoopState, train: TrainState, metrics: Metrics, position: tuple[int, int]) -> LoopState:
    """The state after one optimizer step: the new train state and position, the step's metrics
    pending, and the non-finite counters (``metrics["finite"]`` is 1.0 or 0.0; device arithmetic)."""
    finite = metrics["finite"]
    streak = (state.streak + 1) * (1 - finite)  # reset by a finite step
    return attrs.evolve(
        state,
        train=train,
        position=position,
        streak=streak,
        worst=torch.maximum(state.worst, streak),
        skipped=state.skipped + (1 - finite),
        pending=(*state.pending, metrics),
    )


def flush(state: LoopState) -> tuple[LoopState, list[dict[str, float]]]:
    """Read the pending metrics (one host sync): the state with their losses in its history, and
    one row per step of {metric: value} for the tracker."""
    if not state.pending:
        return state, []
    names = list(state.pending[0])
    table = torch.stack([torch.stack([m[n].float() for n in names]) for m in state.pending]).tolist()
    rows = [dict(zip(names, row, strict=True)) for row in table]
    return attrs.evolve(state, losses=(*state.losses, *(r["loss"] for r in rows)), pending=()), rows


def mean_recent(losses: Sequence[float], window: int) -> float:
    """The mean of the last ``window`` finite losses (the progress bar's loss); NaN for none."""
    part = [x for x in losses[-window:] if x == x]
    return sum(part) / len(part) if part else float("nan")


@attrs.frozen(eq=False)
class Hook:
    """A side effect of the loop: ``fn(state) → state`` after every ``every``-th step (0: never by
    cadence) and after the last step; after a stop request too when ``on_stop``."""

    every: int
    fn: Callable[[LoopState], LoopState]
    on_stop: bool = False


def run_loop(
    state: LoopState,
    take_step: Callable[[LoopState], LoopState],
    hooks: Sequence[Hook],
    *,
    until: int,
    stopped: Callable[[], bool],
    seconds: list[float] | None = None,
) -> tuple[LoopState, bool]:
    """Take steps until ``until`` steps are done or ``stopped()`` says so, calling each due hook,
    in order, after a step (every hook after the last step; the ``on_stop`` ones after a stop).

    Args:
        seconds: if given, receives each step's wall time (batch preparation included).

    Returns:
        (the final state, whether a stop request ended the loop early).
    """
    while state.step < until:
        started = time.perf_counter()
        state = take_step(state)
        if seconds is not None:
            seconds.append(time.perf_counter() - started)
        stop = stopped()
        for hook in hooks:
            if state.step == until or (stop and hook.on_stop) or (hook.every and state.step % hook.every == 0):
                state = hook.fn(state)
        if stop:
            return state, True
    return state, False
