"""Turning YAML files and ``--a.b=c`` overrides into a frozen config tree, at the edge only.

cattrs structures the nested mapping into the attrs schema (``forbid_extra_keys``: an unknown key is
an error that names the closest valid key). The hooks below add what the command line needs on top
of the values fire and YAML already parsed: ``"true"``, ``"8"``, ``"1e-4"`` and ``"null"`` given as
text, a list typed without inner quotes (``[to_q, to_out.0]``), and messages that say which key and
what it accepts. Ranges are the schema's own validators; all of it runs before any model loads.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
import yaml
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from qflux.config.errors import QfluxError
from qflux.config.schema import RecipeConfig

T = TypeVar("T")

_ENCODER_KEYS = {"vae_encoder": "vae", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
SYNONYMS = {"learning_rate": "lr", "rank": "r", "alpha": "lora_alpha", "optimizer": "name", "adapter": "kind"}
"""Other trainers' names for a key's last part (``optimizer.learning_rate`` → ``optimizer.lr``)."""
MOVED = {
    "train.device": "devices.transformer",
    "train.guidance_scale": "model.guidance_scale",
    **{
        f"{section}.{old}_device": f"devices.{new}"
        for section in ("train", "cache")
        for old, new in _ENCODER_KEYS.items()
    },
    **{f"predict.devices.{c}": f"devices.{c}" for c in ("transformer", "vae", "text_encoder", "text_encoder_2")},
    "train.resolution_shift": "train.timestep_sampling: resolution_shift",
}
"""Keys of earlier qflux configs → where they live now (an old key's error names its new place)."""


def field_order(cls: type) -> list[Any]:
    """The attrs fields of ``cls`` in the order the root-most class declares them (a field a
    subclass redeclares, to give it its own type or default, keeps its place), then its own."""
    seen: dict[str, Any] = {}
    for klass in reversed([k for k in cls.__mro__ if attrs.has(k)]):
        for f in attrs.fields(klass):
            if not f.inherited and f.name not in seen:
                seen[f.name] = None
    by_name = {f.name: f for f in attrs.fields(cls)}
    return [by_name[name] for name in seen]


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none"}


def schema_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of an attrs schema, e.g. ``['seed', 'model.lora.r', ...]``."""
    attrs.resolve_types(cls)
    keys: list[str] = []
    for f in field_order(cls):
        name = prefix + f.name
        keys += schema_keys(f.type, name + ".") if isinstance(f.type, type) and attrs.has(f.type) else [name]
    return keys


def _closest(key: str, options: list[str]) -> str:
    """'; did you mean ...?' with the valid key most like ``key``: one with the same last part
    first (``train.lr`` → ``optimizer.lr``), else the closest spelling of the whole key."""
    if key in MOVED:
        return f"; it moved to '{MOVED[key]}'"
    leaf = key.rsplit(".", 1)[-1]
    leaf = SYNONYMS.get(leaf, leaf)
    same_leaf = [o for o in options if o.rsplit(".", 1)[-1] == leaf]
    match = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) if same_leaf else []
    match = match or difflib.get_close_matches(key, options, n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _scalar(tp: type) -> Callable[[Any, Any], Any]:
    """Structure hook of bool / int / float / str that also takes their spelling as text."""

    def hook(value: Any, _: Any) -> Any:
        if isinstance(value, str) and tp is not str:
            text = value.strip().lower()
            if tp is bool and text in _TRUE | _FALSE:
                return text in _TRUE
            if tp is not bool:
                try:
                    return tp(value)
                except ValueError:
                    pass
        elif tp is bool and isinstance(value, bool):
            return value
        elif not isinstance(value, bool) and tp is not bool:
            if tp is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
                return int(value)
            if tp in (float, str) and isinstance(value, int | float | str):
                return tp(value)
        raise ValueError(f"must be {_NAMES[tp]}; got {value!r}")

    return hook


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _literal(value: Any, tp: Any) -> Any:
    options = typing.get_args(tp)
    if isinstance(value, str) and value in options:
        return value
    if value in DENSITIES and "sigma_sqrt" in options:  # train.weighting_scheme of an earlier qflux
        raise ValueError(f"{value} is now train.timestep_sampling: {value} (weighting_scheme weighs the loss "
                         f"only: {', '.join(options)})")  # fmt: skip
    raise ValueError(f"must be one of {', '.join(map(repr, options))}; got {value!r}")


DENSITIES = ("logit_normal", "mode")
"""``train.weighting_scheme`` values of earlier qflux (diffusers' densities), ``train.timestep_sampling``'s now."""


def _union(value: Any, tp: Any) -> Any:
    """The first member of the union that takes ``value`` (``"null"``/``"none"`` for None)."""
    args = typing.get_args(tp)
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NULL)):
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return CONVERTER.structure(value, arg)
        except (ValueError, TypeError, ClassValidationError, IterableValidationError) as e:
            errors.append(_message(e))
    raise ValueError(" / ".join(errors))


def _tuple(value: Any, tp: Any) -> tuple[Any, ...]:
    """A list (or a text like ``[to_q, to_out.0]``, or one item) as the tuple type ``tp``."""
    if isinstance(value, str) and value.strip().startswith("["):  # a list fire left as text
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"must be a list like [a, b]; got {value!r}") from None
    items = [value] if isinstance(value, str | int | float) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"must be a list; got {value!r}")
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(CONVERTER.structure(x, args[0]) for x in items)
    if len(items) != len(args):
        raise ValueError(f"must be a list of {len(args)} values; got {value!r}")
    return tuple(CONVERTER.structure(x, a) for x, a in zip(items, args, strict=True))


CONVERTER = cattrs.Converter(forbid_extra_keys=True)
for _tp in (bool, int, float, str):
    CONVERTER.register_structure_hook(_tp, _scalar(_tp))
CONVERTER.register_structure_hook_func(lambda t: typing.get_origin(t) is typing.Literal, _literal)
CONVERTER.register_structure_hook_func(lambda t: typing.get_origin(t) in (typing.Union, types.UnionType), _union)
CONVERTER.register_structure_hook_func(lambda t: typing.get_origin(t) is tuple, _tuple)


def _message(e: BaseException) -> str:
    """The first leaf error of a cattrs error tree, as '<dotted key> <what it accepts>'."""
    for text in cattrs.transform_error(e, format_exception=lambda exc, _: str(exc)):
        what, _, where = text.rpartition(" @ $")
        key = where.lstrip(".").replace("[", ".").replace("]", "")
        if what.startswith("must "):  # a hook above: the key is the value's own
            return f"{key} {what}"
        first, _, rest = what.partition(" ")
        name = first.strip("'")
        if name.isidentifier() and rest:  # a schema validator: it names its field, in the section at key
            return f"{key}.{name} {rest}" if key else what
        return f"{key}: {what}" if key else what
    return str(e)


def _unknown_key(e: BaseException) -> tuple[str, str] | None:
    """(dotted unknown key, its section prefix) of the first ForbiddenExtraKeysError in ``e``."""
    for exc, note in _leaves(e, ""):
        if isinstance(exc, ForbiddenExtraKeysError):
            return note + sorted(exc.extra_fields)[0], note
    return None


def _leaves(e: BaseException, prefix: str) -> typing.Iterator[tuple[BaseException, str]]:
    """Each leaf error of a cattrs error tree with the dotted prefix of the section it is in."""
    if isinstance(e, ClassValidationError):
        with_notes, without = e.group_exceptions()
        for sub, note in with_notes:
            yield from _leaves(sub, f"{prefix}{note.name}.")
        for sub in without:
            yield from _leaves(sub, prefix)
    else:
        yield e, prefix


def structure(cls: type[T], data: Mapping[str, Any], *, source: str = "config") -> T:
    """Build the attrs schema ``cls`` from a nested mapping.

    Args:
        source: where ``data`` came from (a file name), used in error messages.

    Raises:
        QfluxError: an unknown key (with the closest valid key) or an invalid value, naming the key.
    """
    if not isinstance(data, Mapping):
        raise QfluxError(f"{source}: the config must be a mapping of sections, got {data!r}")
    try:
        return CONVERTER.structure(dict(data), cls)
    except (ClassValidationError, ForbiddenExtraKeysError) as e:
        unknown = _unknown_key(e)
        if unknown is not None:
            key, _ = unknown
            raise QfluxError(f"{source}: unknown config key '{key}'{_closest(key, schema_keys(cls))}") from None
        raise QfluxError(f"{source}: {_message(e)}") from None
    except (ValueError, TypeError) as e:  # a validator of the schema (ranges, combinations)
        raise QfluxError(f"{source}: invalid value: {e}") from None


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
        structure(cls, data, source=source)  # report file errors against the file
    merged = apply_overrides(_merge(_defaults(cls), data), overrides, cls)
    cfg = structure(cls, merged, source=source if not overrides else f"{source} + overrides")
    if isinstance(cfg, RecipeConfig):  # a recipe's config, with its derived defaults written in
        return typing.cast(T, cfg.resolved())
    return cfg


def _defaults(cls: type) -> dict[str, Any]:
    """The schema's own defaults as a nested dict, so that a section a file or an override names keeps the
    defaults its root gives it (FLUX.1 Kontext's ``data.dataset_path`` is not ``DataConfig``'s); {} when the
    schema has required fields."""
    try:
        return to_dict(cls())
    except TypeError:
        return {}


def _merge(base: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``data`` laid over it, section by section."""
    out = dict(base)
    for key, value in data.items():
        below = out.get(key)
        out[key] = _merge(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config tree in schema order (tuples become lists), ready for YAML or JSON."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in field_order(type(cfg))}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(x) for x in value]
    return to_dict(value) if attrs.has(type(value)) else value
