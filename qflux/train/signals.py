"""Turning SIGINT and SIGTERM into a flag that a training loop checks between steps."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def stop_signals() -> Iterator[list[str]]:
    """While active, SIGINT/SIGTERM append their name to the yielded list instead of killing.

    The loop checks the list (empty: keep going) and stops cleanly at the end of the current step.
    The previous handlers are restored on exit. Outside the main thread it only yields the list.
    """
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
