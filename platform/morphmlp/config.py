"""Typed dataclass configs: a YAML file may set any field, CLI overrides win, unknown keys fail.

Every job's configuration is a tree of dataclasses whose defaults are the release's recipe. This
module turns plain mappings into those dataclasses with type checks, so an invalid config fails
before any work starts and names the key and what it allows. YAML is parsed in two places only:
`load_yaml` (a --config file) and `apply_overrides` (`--set a.b=value`); a typed flag's value goes
into the tree as it is (`set_key`), so `--name 007` is the string "007".

The `check_*` helpers are the one way a config section declares its value rules in
`__post_init__`; every message names the key, its value and the rule.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

from morphmlp.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking keys and types recursively."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {_join(where, unknown[0])!r}; "
            f"allowed keys{' under ' + repr(where) if where else ''}: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, _join(where, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able form of a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    """A config tree (or dataclass) as YAML that `load_yaml` reads back to the same values."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = _join(prefix, key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML mapping from a local path or any URI pyarrow.fs understands."""
    from morphmlp.storage import read_bytes

    try:
        data = yaml.safe_load(read_bytes(path).decode("utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings (value parsed as YAML) to a nested mapping."""
    result = _deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.epochs=5)"
            )
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        try:
            result = set_key(result, key, value)
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from err
    return result


def set_key(tree: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with dotted `key` set to `value` as given (a typed flag: no parsing)."""
    result = _deepcopy(tree)
    node = result
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value
    return result


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; values in `update` win."""
    result = _deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = _deepcopy(value)
    return result


# -- value rules, declared in each section's __post_init__ -------------------------------------


def check(section: str, obj: Any, name: str, ok: bool, rule: str) -> None:
    """Raise `<section>.<name>=<value> must be <rule>` unless `ok`."""
    if not ok:
        raise ConfigError(f"{_join(section, name)}={getattr(obj, name)!r} must be {rule}")


def check_positive(section: str, obj: Any, *names: str) -> None:
    """Each named field is a number > 0."""
    for name in names:
        check(section, obj, name, _number(getattr(obj, name)) and getattr(obj, name) > 0, "> 0")


def check_at_least(
    section: str, obj: Any, minimum: float, *names: str, optional: bool = False
) -> None:
    """Each named field is a number >= `minimum` (or None, when `optional`)."""
    rule = f">= {minimum}" + (" or null" if optional else "")
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        check(section, obj, name, _number(value) and value >= minimum, rule)


def check_range(
    section: str, obj: Any, name: str, low: float, high: float, *, high_open: bool = False
) -> None:
    """The named field is a number in [low, high] (or [low, high) with `high_open`)."""
    value = getattr(obj, name)
    within = _number(value) and low <= value and (value < high if high_open else value <= high)
    check(section, obj, name, within, f"in [{low:g}, {high:g}{')' if high_open else ']'}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _deepcopy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _deepcopy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deepcopy(v) for v in tree]
    return tree


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{where}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, list):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [
                _coerce(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            inner = args[0] if args else Any
            items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
