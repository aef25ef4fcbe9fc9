"""Strict loading of nested dataclass configs from YAML plus ``section.key=value`` overrides.

Unknown keys and wrong types are errors that name the key (``model.moe.top_k: expected int, got
str 'three'``). Kept free of heavy imports so light commands (DME) can use it too.

Choices and ranges are declared on the dataclass fields and checked here:

- a ``typing.Literal[...]`` field holds one of its values: :func:`check_choices`, which a section's
  ``__post_init__`` calls (so a section built in code is checked too);
- a field declared with :func:`ranged` (a list field: each element) lies within its range:
  :func:`check_field_ranges`, which the config root calls once the whole tree is built.

Constraints between fields stay explicit code beside the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    pass


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:  # the choices' one type here; the choice itself is check_choices'
        kinds = {type(choice) for choice in typing.get_args(tp)}
        if len(kinds) != 1:
            raise ConfigError(f"{key}: unsupported config type {tp} (choices of one type only)")
        return _convert(value, kinds.pop(), key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, it, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: accept a finite number written so
            try:
                number = float(value.strip())
            except ValueError:
                raise ConfigError(f"{key}: expected float, got str {value!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got str {value!r}")
            return number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):  # YAML's .inf / .nan: no setting reads them as "unbounded" or "unset"
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {tp}")


RangeKind = Literal["[]", "(]", "[)"]
RANGE = "range"  # the field-metadata key of ranged()


def ranged(default: Any, low: float | None = None, high: float | None = None, kind: RangeKind = "[]") -> Any:
    """A dataclass field with default ``default`` whose value (a list's: each element) must be finite and within
    ``low``..``high``: kind "[]" closed, "(]" low excluded, "[)" high excluded; None: unbounded on that side."""
    if kind not in typing.get_args(RangeKind):
        raise ValueError(f"range kind {kind!r}: expected one of {typing.get_args(RangeKind)}")
    metadata = {RANGE: (low, high, kind)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _in_range(value: float, low: float | None, high: float | None, kind: str) -> bool:
    if low is not None and (value < low or (kind == "(]" and value == low)):
        return False
    return high is None or value < high or (value == high and kind != "[)")


def _describe(low: float | None, high: float | None, kind: str) -> str:
    if high is None:
        return "a finite number" if low is None else f"{'>' if kind == '(]' else '>='} {low:g}"
    if low is None:
        return f"{'<' if kind == '[)' else '<='} {high:g}"
    return f"in {'(' if kind == '(]' else '['}{low:g}, {high:g}{')' if kind == '[)' else ']'}"


def check_field_ranges(obj: Any, prefix: str = "") -> None:
    """Every :func:`ranged` field of dataclass ``obj`` and of its nested sections within its range; the
    ConfigError names the key (``prefix`` + the field's path, ``[i]`` for a list element)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_field_ranges(value, key + ".")
            continue
        if RANGE not in f.metadata:
            continue
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            where = f"{key}[{i}]" if isinstance(value, list) else key
            if not math.isfinite(v):  # set in code (YAML values are refused while parsing)
                raise ConfigError(f"{where}: must be a finite number, got {v!r}")
            if not _in_range(v, *f.metadata[RANGE]):
                raise ConfigError(f"{where}: must be {_describe(*f.metadata[RANGE])}, got {v!r}")


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """(name, choices) of each ``Literal`` field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, typing.get_args(hints[f.name])) for f in dataclasses.fields(cls)
                 if typing.get_origin(hints[f.name]) is Literal)


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of dataclass ``obj`` holds one of its choices; ConfigError names the key
    (``prefix`` + the field's name). Called by each section's ``__post_init__``."""
    for name, choices in _literal_fields(type(obj)):
        if getattr(obj, name) not in choices:
            raise ConfigError(f"{prefix}{name}: expected one of {choices}, got {getattr(obj, name)!r}")


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in unknown)} (known: {sorted(names)})")
    defaults = cls()
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        else:
            kwargs[name] = getattr(defaults, name)
    return cls(**kwargs)


def missing_keys(cls: type, data: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys of dataclass ``cls`` (nested sections included, in field order) that ``data`` does not give,
    which :func:`build` fills with defaults; the keys inside a dict-typed field are the field's own."""
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            missing.append(key)
        elif dataclasses.is_dataclass(hints[f.name]) and isinstance(data[f.name], dict):
            missing += missing_keys(hints[f.name], data[f.name], key + ".")
    return missing


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a nested mapping (value parsed as a YAML scalar)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML ({yaml_problem(err)})") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (line, column), without the file's name."""
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_yaml(path: str | Path | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The mapping in ``path`` (empty without one) with the overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {yaml_problem(err)}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides or []:
        apply_override(data, assignment)
    return data
