"""Typed construction of configuration dataclasses from YAML-parsed mappings: each value checked against
its field's annotation (numbers, booleans, strings, lists with the comma form ``1,2,4``, nested sections,
optional ``null``), unknown keys refused, and every problem a :class:`ConfigError` of one line naming the
key. Knows nothing of the run schema itself (:mod:`flowmaps.runs.config`)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

import yaml

__all__ = ["ConfigError", "to_dict", "build", "read_yaml", "parse_override"]


class ConfigError(ValueError):
    """A configuration problem; the message is one line naming the key and the problem."""


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(key, value, option)
            except ConfigError as err:
                errors.append(err)
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o))
                            for o in options)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if annotation is list or origin is list:
        if isinstance(value, str) and "," in value:  # the comma form, eval.steps=1,2,4
            value = _comma_list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return value
    if annotation is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, e.g. {{width: 64}}, got {type(value).__name__} "
                              f"{value!r}")
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, key)
    raise ConfigError(f"{key}: unsupported type {annotation}")


def _comma_list(text: str) -> list:
    """``"1,2,4"`` → ``[1, 2, 4]``: each comma-separated item read as a YAML scalar (empty items, as
    after a trailing comma, are dropped), so a list key takes the form ``--steps`` takes on the command
    line."""
    items = []
    for item in text.split(","):
        if item.strip():
            try:
                items.append(yaml.safe_load(item))
            except yaml.YAMLError:
                items.append(item.strip())
    return items


def build(cls, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{where}; "
                          f"known: {', '.join(sorted(names))}")
    base = cls()
    values = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _check_type(key, data[name], hints[name])
        else:
            values[name] = getattr(base, name)
    return cls(**values)


def read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:  # safe_load: tags such as !!python/object are refused, never run
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        problem = " ".join(str(getattr(err, "problem", None) or "").split())[:120]
        detail = "; ".join(x for x in (f"line {line + 1}" if line is not None else "", problem) if x)
        raise ConfigError(f"{where}: not valid YAML" + (f" ({detail})" if detail else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.steps=2000")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value
