"""Typed, strict configuration.

Configs are frozen dataclasses. :func:`from_dict` builds one from a plain mapping (a parsed TOML file), and
refuses an unknown key or a value of the wrong type *before any work starts*, naming the dotted key
(``teacher.model.mlp``). ``--set a.b=v`` overrides are parsed as TOML values and go through the same checks.
Each section nests the dataclasses that the working module defines, so there is one source of truth for every
hyper-parameter and its default.

A table merges over its default: the keys it leaves out keep the value they have in the default of the field
that holds the table (a section default built by a factory, e.g. a DCN-V2 teacher), not the bare defaults of the
nested class. So ``--set teacher.model.emb_dim=16`` changes one number of the default teacher and nothing else.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: unknown key, wrong type or impossible value. The message names the key."""


class FieldError(ConfigError):
    """An impossible value of one field of a config dataclass (raised by its ``__post_init__``).

    Built directly the message names ``Class.field``; :func:`from_dict` re-raises it under the field's dotted key
    (``teacher.train.lr = nan: must be a finite number > 0``)."""

    def __init__(self, owner: str, field: str, value: Any, want: str):
        self.owner, self.field, self.value, self.want = owner, field, value, want
        super().__init__(f"{owner}.{field} = {value!r}: {want}")

    def at(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.field} = {self.value!r}: {self.want}" if prefix else str(self))


def require(obj: Any, name: str, ok: bool, want: str) -> None:
    """Raise :class:`FieldError` for field ``name`` of the config ``obj`` unless ``ok``; ``want`` says what the
    value must be ("must be a finite number > 0")."""
    if not ok:
        raise FieldError(type(obj).__name__, name, getattr(obj, name), want)


def finite(x: Any) -> bool:
    """A real number that is not NaN or +-inf."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(x: Any) -> bool:
    """A finite number > 0."""
    return finite(x) and x > 0


def nonnegative(x: Any) -> bool:
    """A finite number >= 0."""
    return finite(x) and x >= 0


def at_least(x: Any, lo: int) -> bool:
    """An integer >= lo."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples, int -> float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: what X wants says more than the union's name
            # (a nested element's error, replay.channels[0]: ..., is about the element, which cannot be unset)
            raise ConfigError(f"{errors[0]} (or unset)" if errors[0].startswith(f"{key}:") else errors[0])
        raise ConfigError(f"{key}: value {value!r} is not a {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: value {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return tuple(coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called), or MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError.

    base: the instance ``data`` merges over (None: the class's defaults). A nested table merges over the value
    the field has in ``base``, or without base over the field's own default (see the module docstring).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key {where!r} (known keys here: {sorted(fields)})")
    kwargs = {} if base is None else {name: getattr(base, name) for name in fields}
    for name, value in data.items():
        key, tp = f"{prefix}.{name}" if prefix else name, hints[name]
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, Mapping) and isinstance(default, tp):
            kwargs[name] = from_dict(tp, value, key, base=default)
        else:
            kwargs[name] = coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise e.at(prefix) from None
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        said = str(e)  # a message that names its own key under the section already says where
        raise ConfigError(said if prefix and said.startswith(f"{prefix}.") else f"{prefix or cls.__name__}: {said}"
                          ) from None


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain TOML/JSON-friendly data (tuples -> lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` where value is a TOML value (bare words are taken as strings)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` set (tables created as needed)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for p in path[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a table")
            node = nxt
        node[path[-1]] = value
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file (a directory, FIFO or device)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
         base: Mapping[str, Any] | None = None) -> T:
    """Load ``cls`` from a TOML file (or ``base``) with ``--set`` overrides applied and type-checked."""
    data = dict(base or {}) if path is None else load_toml(path)
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)


ABSENT = "(absent)"  # how a key that one side of a config_diff lacks is shown


def config_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The leaves where two plain configs (nested dicts of JSON values) differ: [(dotted key, old, new)], in key
    order; a key missing on one side has :data:`ABSENT` there. Tuples and lists compare equal element by element."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, Any, Any]] = []
        for k in sorted(set(old) | set(new), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append((key, old.get(k, ABSENT), new.get(k, ABSENT)))
            else:
                out += config_diff(old[k], new[k], key)
        return out
    return [] if _plain(old) == _plain(new) else [(prefix, old, new)]


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_get(cfg: Any, key: str) -> Any:
    """The value at dotted ``key`` of a plain nested config, or :data:`ABSENT`."""
    for part in key.split("."):
        if not isinstance(cfg, Mapping) or part not in cfg:
            return ABSENT
        cfg = cfg[part]
    return cfg


def format_diff(diff: list[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``key: old -> new`` for the first ``limit`` differences, then how many more (JSON spelling of values)."""

    def show(v: Any) -> str:
        return v if v is ABSENT else json.dumps(v, default=str)

    parts = [f"{k}: {show(a)} -> {show(b)}" if k else f"{show(a)} -> {show(b)}" for k, a, b in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"and {len(diff) - limit} more")
    return ", ".join(parts)
