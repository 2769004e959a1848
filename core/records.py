"""The JSON records that processes and runs hand each other (slot manifests, checkpoint run states):
sealed when written, and checked field by field against the types their dataclass declares when read,
before any is used.

Such a file can be torn by a crash, damaged on a disk, or written by something that is not us; a
reader that took it as it came could index with a string, allocate by a number of 10**18, or open a
file named `../../x`. `sealed_json` adds the xxh3 of the record's content (`SEAL`), so that a
torn or changed record is refused however plausible what is left looks; `from_json` turns every
way a record can be wrong into one `RecordError` line naming the file and the field; the
dataclass's own `check()` adds what a type cannot say (a count that must be positive, a name that
must stay inside its folder). Records written before seals are read without one, when every key
they hold is a field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import Any, Optional, TypeVar, Union

from core.integrity import checksum

T = TypeVar("T")
SEAL = "sealed_xxh3"
LARGEST = 2**62  # larger than any step, token count, size or count a run can reach


class RecordError(ValueError):
    """A record that cannot be used; the message names its file and what is wrong, in one line."""


def _type_problem(value: Any, expected: Any) -> Optional[str]:
    """None when `value` (parsed JSON) is of the `expected` type; else what it is instead."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return None
    if origin is Union:
        problems = [_type_problem(value, arm) for arm in args]
        return None if any(p is None for p in problems) else next(p for p in problems if p)
    if expected is type(None):
        return None if value is None else f"is {type(value).__name__}, not null"
    if expected is bool:
        return None if isinstance(value, bool) else f"is {type(value).__name__}, not true/false"
    if expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"is {type(value).__name__}, not an integer"
        return None if abs(value) < LARGEST else f"is {value}, out of range"
    if expected is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"is {type(value).__name__}, not a number"
        return None if math.isnan(value) or abs(value) < float(LARGEST) else f"is {value}, out of range"
    if expected is str:
        return None if isinstance(value, str) else f"is {type(value).__name__}, not a string"
    if expected is list or origin is list:
        if not isinstance(value, list):
            return f"is {type(value).__name__}, not a list"
        for i, item in enumerate(value):
            problem = _type_problem(item, args[0]) if args else None
            if problem:
                return f"[{i}] {problem}"
        return None
    if expected is dict or origin is dict:
        if not isinstance(value, dict):
            return f"is {type(value).__name__}, not an object"
        for key, item in value.items():
            problem = _type_problem(item, args[1]) if args else None
            if problem:
                return f"[{key!r}] {problem}"
        return None
    raise TypeError(f"records: no check for {expected!r}")  # a field type this module does not know: a bug


def seal_of(data: dict[str, Any]) -> str:
    """The seal of a record's content (its fields but the seal)."""
    content = {key: value for key, value in data.items() if key != SEAL}
    return checksum(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def sealed_json(record: Any) -> str:
    """A dataclass record as JSON, with the seal of its content."""
    data = dataclasses.asdict(record)
    return json.dumps({**data, SEAL: seal_of(data)}, indent=1) + "\n"


def from_json(cls: type[T], path: str) -> T:
    """The dataclass `cls` read from the JSON file `path`, every field of the declared type (fields
    the file lacks take their defaults; a key the class does not know is refused), then `check()`ed
    when the class has one. RecordError on anything else; FileNotFoundError when there is no file."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise RecordError(f"{path} cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path} is not a JSON object")
    if SEAL in data and data[SEAL] != seal_of(data):
        raise RecordError(f"{path} does not match its seal: torn or changed since it was written")
    hints = typing.get_type_hints(cls)
    unknown = next((key for key in data if key not in hints and key != SEAL), None)
    if unknown is not None:  # (a damaged seal's name among them: no record is read unsealed by accident)
        raise RecordError(f"{path} has {unknown!r}, not a field of a {cls.__name__}: damaged, or written by "
                          f"another version")
    values = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise RecordError(f"{path} lacks {field.name}")
            continue
        problem = _type_problem(data[field.name], hints[field.name])
        if problem:
            raise RecordError(f"{path}: {field.name}{'' if problem.startswith('[') else ' '}{problem}")
        values[field.name] = data[field.name]
    record = cls(**values)
    problem = record.check() if hasattr(record, "check") else None
    if problem:
        raise RecordError(f"{path}: {problem}")
    return record


def inside_name(name: str) -> bool:
    """Whether `name` is a path relative to its folder that stays inside it."""
    parts = name.split("/")
    return bool(name) and not os.path.isabs(name) and "\\" not in name and "\0" not in name and \
        all(part not in ("", ".", "..") for part in parts)


def file_records_problem(files: dict[str, Any], key: str = "files") -> Optional[str]:
    """None when `files` maps names inside the folder to {"bytes": size, "xxh3": 16 hex digits}."""
    for name, record in files.items():
        if not inside_name(name):
            return f"{key} names {name!r}, not a file inside the folder"
        if not isinstance(record, dict) or set(record) != {"bytes", "xxh3"}:
            return f"{key}[{name!r}] is not a record of bytes and xxh3"
        size, digest = record["bytes"], record["xxh3"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < LARGEST:
            return f"{key}[{name!r}] bytes is {size!r}, not a size"
        if not isinstance(digest, str) or len(digest) != 16 or any(c not in "0123456789abcdef" for c in digest):
            return f"{key}[{name!r}] xxh3 is {digest!r}, not a digest"
    return None
