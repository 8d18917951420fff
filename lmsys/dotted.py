"""Nested dicts as dotted keys, and dotted keys into typed dataclasses: the generic machinery
under lmsys.config (which owns the schema, the YAML files, the overrides and ConfigError).

    flatten({"mesh": {"fsdp": 4}})             # {"mesh.fsdp": 4}
    all_keys(Config)                           # ["model.preset", ..., "init_from"]
    build(Config, {"mesh.fsdp": "4"})          # Config(mesh=MeshConfig(fsdp=4, ...), ...)

A value that does not convert to its field's type is a TypeError that names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key a dataclass (and the dataclasses in its fields) accepts, e.g. `model.d_model`."""
    keys = []
    for name in _fields(cls):
        t = _field_type(cls, name)
        if dataclasses.is_dataclass(t):
            keys += all_keys(t, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def coerce(key: str, value: Any, t) -> Any:
    """Converts a YAML / command-line value to the field's type, or says why it can't."""
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled config type {t}")
    raise TypeError(f"config key '{key}' must be {t.__name__}, got {value!r}")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one dict of dotted keys: {"mesh": {"fsdp": 4}} -> {"mesh.fsdp": 4}."""
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + str(k)] = v
    return flat


def build(cls, flat: dict[str, Any], prefix: str = ""):
    """The dataclass `cls` with the values of `flat` (dotted keys) converted to its field types;
    fields not in `flat` keep their defaults."""
    kwargs = {}
    for name in _fields(cls):
        t = _field_type(cls, name)
        key = prefix + name
        if dataclasses.is_dataclass(t):
            kwargs[name] = build(t, flat, key + ".")
        elif key in flat:
            kwargs[name] = coerce(key, flat[key], t)
    return cls(**kwargs)
