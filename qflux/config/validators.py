"""attrs validators of the config schema: ranges, choices and device strings, each naming the key and the fix."""

from __future__ import annotations

import re
from typing import Any

import attrs


def positive(inst: Any, att: Any, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{att.name} must be > 0, got {value!r}")


def positive_or_none(inst: Any, att: Any, value: Any) -> None:
    if value is not None:
        positive(inst, att, value)


def unit_interval(inst: Any, att: Any, value: Any) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{att.name} must be in [0, 1), got {value!r}")


def non_negative(inst: Any, att: Any, value: Any) -> None:
    if value < 0:
        raise ValueError(f"{att.name} must be >= 0, got {value!r}")


def probability(inst: Any, att: Any, value: Any) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{att.name} must be in [0, 1], got {value!r}")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device(inst: Any, att: Any, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(f"{att.name} must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {value!r}")


def device_field(doc_default: str = "auto") -> Any:
    return attrs.field(default=doc_default, validator=device)


def init_lora(inst: Any, att: Any, value: Any) -> None:
    if value not in (True, False, "gaussian"):
        raise ValueError(f"{att.name} must be one of true, false, 'gaussian'; got {value!r}")


def read_only_when(inst: Any, section: str, readers: dict[str, tuple[bool, str]]) -> None:
    """Refuse a key of ``inst`` set away from its default where nothing reads it.

    Args:
        readers: {field name: (whether this config reads it, the setting that would)}.
    """
    for f in attrs.fields(type(inst)):
        if f.name in readers and not readers[f.name][0] and getattr(inst, f.name) != f.default:
            setting = readers[f.name][1]
            raise ValueError(f"{section}.{f.name} is read only by {setting}; set {setting}, or remove the key")
