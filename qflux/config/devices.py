"""Device strings from configs ('auto', 'cpu', 'cuda:1', ...) to torch devices, checked early."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from qflux.config.errors import QfluxError


def resolve_device(name: str, *, key: str) -> torch.device:
    """'auto' → cuda when available, else cpu; others are checked against the machine.

    Args:
        key: the config key the value came from, for the error message.

    Raises:
        QfluxError: a CUDA or MPS device that this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QfluxError(f"{key} is '{name}' but this machine has no CUDA device; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QfluxError(f"{key} is '{name}' but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise QfluxError(f"{key} is '{name}' but MPS is not available here; use 'cpu' or 'auto'")
    return dev


def component_devices(devices: Any) -> dict[str, torch.device]:
    """{component: device} of a config's ``devices`` section, each checked against the machine."""
    return {name: resolve_device(value, key=f"devices.{name}") for name, value in attrs.asdict(devices).items()}
