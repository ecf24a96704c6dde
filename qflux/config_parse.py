"""Turning YAML files and ``--a.b=c`` overrides into a frozen config tree, at the edge only.

Unknown keys are rejected with the closest valid key; values are coerced to the schema's types
(``"true"`` → ``True``, ``"1e-4"`` → ``1e-4``) and range-checked by the schema's validators, all
before any model loads.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import yaml

from qflux.errors import QfluxError

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of an attrs schema, e.g. ``['seed', 'model.lora.r', ...]``."""
    attrs.resolve_types(cls)
    keys: list[str] = []
    for f in attrs.fields(cls):
        name = prefix + f.name
        if isinstance(f.type, type) and attrs.has(f.type):
            keys += schema_keys(f.type, name + ".")
        else:
            keys.append(name)
    return keys


def _closest(key: str, options: list[str]) -> str:
    """'; did you mean ...?' with the valid key most like ``key``: one with the same last part
    first (``train.lr`` → ``optimizer.lr``), else the closest spelling of the whole key."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [o for o in options if o.rsplit(".", 1)[-1] == leaf]
    match = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) if same_leaf else []
    match = match or difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` or raise ``ValueError`` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(" / ".join(errors) if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}; got {value!r}")
    if origin is tuple:
        if isinstance(value, str) and value.strip().startswith("["):  # [to_q, to_out.0]: a list fire left as text
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ValueError(f"{key} must be a list like [a, b]; got {value!r}") from None
        items = [value] if isinstance(value, str | int | float) else value
        if not isinstance(items, list | tuple):
            raise ValueError(f"{key} must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(x, args[0], key) for x in items)
        if len(items) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values; got {value!r}")
        return tuple(_coerce(x, a, key) for x, a in zip(items, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key} must be a string; got {value!r}")
    raise ValueError(f"{key}: unsupported schema type {tp!r}")  # pragma: no cover - schema bug


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Build the attrs schema ``cls`` from a nested mapping.

    Args:
        cls: an ``attrs`` class whose fields may themselves be attrs classes.
        data: nested mapping, e.g. parsed YAML.
        source: where ``data`` came from (a file name), used in error messages.
        prefix: dotted path of ``cls`` inside the root (for messages).

    Raises:
        QfluxError: an unknown key (with the closest valid key) or an invalid value.
    """
    attrs.resolve_types(cls)  # type: ignore[type-var]
    if not isinstance(data, Mapping):
        raise QfluxError(f"{source}: '{prefix.rstrip('.') or 'root'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in fields:
            options = [prefix + k for k in fields]
            raise QfluxError(f"{source}: unknown config key '{dotted}'{_closest(dotted, options)}")
        ftype = fields[key].type
        if isinstance(ftype, type) and attrs.has(ftype):
            kwargs[key] = from_dict(ftype, value or {}, source=source, prefix=dotted + ".")
        else:
            try:
                kwargs[key] = _coerce(value, ftype, dotted)
            except ValueError as e:
                raise QfluxError(f"{source}: {e}") from None
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        where = prefix.rstrip(".") or "config"
        raise QfluxError(f"{source}: invalid value in '{where}': {e}") from None


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """Return a copy of nested ``data`` with dotted ``overrides`` (``{'model.lora.r': 8}``) set.

    Raises:
        QfluxError: an override names a key the schema ``cls`` does not have.
    """
    valid = schema_keys(cls)
    out: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if key not in valid:
            raise QfluxError(f"unknown option '--{key}'{_closest(key, valid)}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = value
    return out


def load_config(cls: type[T], path: str | Path | None, overrides: Mapping[str, Any]) -> T:
    """Read a YAML file (or start from the schema defaults when ``path`` is None) and apply overrides.

    Raises:
        QfluxError: a missing or unparsable file, an unknown key or an invalid value.
    """
    data: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise QfluxError(f"config file '{p}' does not exist; pass --config=PATH to a YAML file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise QfluxError(f"config file '{p}' is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise QfluxError(f"config file '{p}' must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
        from_dict(cls, data, source=source)  # report file errors against the file
    merged = apply_overrides(data, overrides, cls)
    return from_dict(cls, merged, source=source if not overrides else f"{source} + overrides")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config tree (tuples become lists), ready for YAML or JSON."""
    result: dict[str, Any] = attrs.asdict(
        cfg, value_serializer=lambda _i, _f, v: list(v) if isinstance(v, tuple) else v
    )
    return result
