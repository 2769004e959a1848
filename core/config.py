"""YAML (plus `section.key=value` overrides) -> typed dataclasses, with every mistake one line.

Generic: the sections are declared by their owners (`*Args` dataclasses next to their code, each
with a `validate()` of its own); the root config composes them. Field types understood: bool,
int, float, str, FilePath (a str whose leading `~` is expanded as it is read, so every rank and
every check sees the same path), Optional[...], list[...], dict, nested dataclasses and
Literal[...] (the allowed values). A job file may start with `base: other.yaml` and state only what
it changes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

FilePath = typing.NewType("FilePath", str)  # a path: `~` and `~user` expanded when the config is read


class ConfigError(ValueError):
    """A mistake in the job config or on the command line; the message names the key."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the project's commands: a bad argument is one line and exit status 2, like a
    config error, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} ({self.prog} --help)\n")


def need(ok: bool, message: str) -> None:
    """The one way a validate() refuses: a ConfigError whose message names the key."""
    if not ok:
        raise ConfigError(message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(inner, value, key)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        # YAML reads `2` as an int and `1-sqrt` as a string: compare like with like.
        match = [a for a in allowed if type(a) is type(value) and a == value]
        if not match:
            raise ConfigError(f"{key}: must be one of {', '.join(str(a) for a in allowed)}, got {value!r}")
        return match[0]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        # YAML reads 1e6 as a string and users write 2.0e3; both are fine when integral.
        number = _number(value)
        if number is None or float(number) != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if tp is str or tp is FilePath:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return os.path.expanduser(value) if tp is FilePath else value
    raise TypeError(f"{key}: unsupported config field type {_type_name(tp)}")


def build_dataclass(cls: type, data: Any, key: str = "") -> Any:
    """Instantiate `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    where = key or "job"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in names:
            raise ConfigError(f"unknown key '{prefix}{name}' (known keys of {where}: {', '.join(names)})")
    return cls(**{name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()})


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot read value {raw!r}: {str(e).splitlines()[0]}") from None
    return keys, value


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])} is a value, not a section: cannot set {'.'.join(keys)}")
        node = child
    node[keys[-1]] = value


def merge_sections(base: dict, delta: dict) -> dict:
    """`delta` on top of `base`, section by section (lists and values are replaced whole)."""
    out = dict(base)
    for key, value in delta.items():
        out[key] = merge_sections(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping; `base: other.yaml` (relative to this file) is read first and
    this file's sections are laid over it."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base job file not found: {base_path}")
    return merge_sections(read_config_file(base_path, seen + (path.resolve(),)), raw)


def load_config(cls: type, path: Path, overrides: typing.Iterable[str] = ()) -> Any:
    """Read a config file, apply overrides, build `cls`, and run its `validate()`."""
    if not path.is_file():
        raise ConfigError(f"job file not found: {path}")
    raw = read_config_file(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    config = build_dataclass(cls, raw)
    validate: Optional[Callable[[], None]] = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def get_value(config: Any, dotted: str) -> Any:
    """One resolved value by its dotted key (e.g. `train.steps`)."""
    value: Any = to_dict(config)
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ConfigError(f"--get {dotted}: no such key")
        value = value[key]
    return value
