"""Unpickling without running anyone's code.

A torch.save file is a pickle, and a plain `torch.load` runs whatever code the file names. Every
torch file this project reads goes through `load`: torch's weights-only unpickler (tensors,
containers, numbers, strings), plus the few DeepSpeed names that DeepSpeed's own checkpoints hold
(`DEEPSPEED_TYPES`: an enum and records of plain numbers). Those names are admitted only as stand-ins
that cannot touch anything shared: the enum as a function returning a plain int (the unpickler would
otherwise hand back the enum's one shared member and apply the file's state to it, for the rest of
the process), the records as subclasses of DeepSpeed's own whose `__setstate__` takes plain values
for their data fields only. A file that names anything else is refused in one line naming the file
and what it names. Full pickle happens only inside `trusting(True)`, where the user has said they
trust the source (`checkpoint.trust_pickle` for a job's init_from/growth source, `--trust-pickle`
for the tools).

DeepSpeed's `load_checkpoint` reads through its checkpoint engine, whose `load` is ours
(`route_deepspeed_loads`): no process-wide switch, so threads cannot undo each other's.
"""
from __future__ import annotations

import contextlib
import contextvars
import copyreg
import enum
import functools
import importlib
import pickle
from typing import Any, Callable, Iterator, Optional

import torch

# What DeepSpeed 0.19's checkpoints hold besides tensors and containers, at ZeRO stages 0-3
# (torch.serialization.get_unsafe_globals_in_checkpoint on their files): an enum, and records of
# plain numbers. Each is admitted as the stand-in `_stand_ins` makes for it.
DEEPSPEED_TYPES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
TRUST_HINT = ("if you trust where it came from, set checkpoint.trust_pickle=true (jobs) or pass --trust-pickle "
              "(tools): that unpickles it in full, running any code it names")

_trust = contextvars.ContextVar("trust_pickle", default=False)


class PickleError(ValueError):
    """A torch file that cannot be read; the message names it."""


class UnsafePickle(PickleError):
    """A torch file whose pickle names code beyond tensors and DeepSpeed's plain types."""

    def __init__(self, message: str, names: tuple[str, ...] = ()):
        super().__init__(message)
        self.names = names


def add_trust_option(parser) -> None:
    """The tools' --trust-pickle (argparse)."""
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle the input's torch files in full, running any code they name: only for files "
                             "from a source you trust that hold more than tensors and DeepSpeed's plain types")


@contextlib.contextmanager
def trusting(trust: bool) -> Iterator[None]:
    """Inside (this thread or task): `load` unpickles in full when `trust` is true."""
    token = _trust.set(trust)
    try:
        yield
    finally:
        _trust.reset(token)


class RefusedState(ValueError):
    """A DeepSpeed record in a file whose state is not plain values for its data fields."""


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _checked_state(cls: type, state: Any) -> dict[str, Any]:
    """`state` when it is a dict of plain values for data fields (not methods or properties of `cls`,
    not private names); else RefusedState."""
    if not isinstance(state, dict):
        raise RefusedState(f"a {cls.__name__} record whose state is a {type(state).__name__}, not fields")
    for key, value in state.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_") or hasattr(cls, key):
            raise RefusedState(f"a {cls.__name__} record sets {key!r}, which is not one of its data fields")
        if not isinstance(value, _PLAIN):
            raise RefusedState(f"a {cls.__name__} record's {key} is a {type(value).__name__}, not a plain value")
    return state


def _record_stand_in(cls: type) -> type:
    """A subclass of DeepSpeed's record class `cls`, made fresh for each record read: its `__setstate__`
    takes plain values for data fields only, then the object becomes a plain `cls` (DeepSpeed keeps it,
    uses it and saves it again as its own)."""

    def __setstate__(self, state):
        self.__dict__.update(_checked_state(cls, state))
        self.__class__ = cls

    def __reduce_ex__(self, protocol):  # (one read without state, never given it: saved as DeepSpeed's class)
        return copyreg.__newobj__, (cls,), dict(self.__dict__)

    return type(cls.__name__, (cls,), {"__setstate__": __setstate__, "__reduce_ex__": __reduce_ex__,
                                       "__module__": __name__, "__doc__": f"{cls.__name__} as read from a file"})


def _enum_stand_in(cls: type) -> Callable[[Any], int]:
    """A function the unpickler calls in place of int-enum `cls`: its member's plain int value."""

    def value_of(value):
        if not isinstance(value, int) or isinstance(value, bool):
            raise RefusedState(f"a {cls.__name__} of {type(value).__name__} {value!r}")
        return int(cls(value))

    return value_of


@functools.cache
def _stand_ins() -> tuple[tuple[Any, str], ...]:
    """(stand-in, the DeepSpeed name it answers to) for every name of DEEPSPEED_TYPES this DeepSpeed has."""
    from core.deepspeed_compat import use_deepspeed_here

    use_deepspeed_here()
    found = []
    for dotted in DEEPSPEED_TYPES:
        module, name = dotted.rsplit(".", 1)
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):  # another DeepSpeed version: that type cannot be in its files
            continue
        found.append((_enum_stand_in(cls) if issubclass(cls, enum.Enum) else _record_stand_in(cls), dotted))
    return tuple(found)


def _torch_load(path: str, mmap: bool, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=weights_only)
    except RuntimeError as e:
        if not mmap or ("mmap" not in str(e) and "zip" not in str(e)):
            raise
        return torch.load(path, map_location=map_location, weights_only=weights_only)  # torch's legacy format


def _unsafe_names(path: str) -> list[str]:
    """The globals a torch file's pickle names that the weights-only unpickler does not allow."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file (legacy format): the unpickler's own message says what it met
        return []


def load(path: str, mmap: bool = True, shown_as: Optional[str] = None, map_location: Any = "cpu") -> Any:
    """The object a torch.save file holds, unpickled weights-only (see the module's doc); tensors
    mapped from the file with `mmap` (paged in when touched). `shown_as`: the name errors give the
    file (e.g. when `path` is /proc/self/fd/N)."""
    name = shown_as or path
    if _trust.get():
        return _read(path, name, mmap, map_location, weights_only=False)
    try:
        return _read(path, name, mmap, map_location, weights_only=True)
    except UnsafePickle as refused:
        if not refused.names or not set(refused.names) <= set(DEEPSPEED_TYPES):
            raise
    with torch.serialization.safe_globals(list(_stand_ins())):  # a DeepSpeed checkpoint's own files
        return _read(path, name, mmap, map_location, weights_only=True)


def _read(path: str, name: str, mmap: bool, map_location: Any, weights_only: bool) -> Any:
    try:
        return _torch_load(path, mmap, map_location, weights_only)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        names = _unsafe_names(path) if weights_only and "Weights only load failed" in str(e) else []
        if names:
            raise UnsafePickle(f"{name} holds Python objects besides tensors ({', '.join(names)}); "
                               f"refusing to unpickle it: {TRUST_HINT}", tuple(names)) from None
        raise PickleError(f"cannot read {name}: {_unpickler_reason(e)}") from None
    except Exception as e:  # truncated, not a torch.save file, a refused record, a crafted opcode stream
        raise PickleError(f"cannot read {name}: {_first_line(e)}") from None


def _unpickler_reason(e: BaseException) -> str:
    """torch's weights-only refusal says why on a line of its own, after paragraphs of advice."""
    _, marker, after = str(e).partition("WeightsUnpickler error:")
    reason = next((line.strip() for line in after.splitlines() if line.strip()), None) if marker else None
    return reason or _first_line(e)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def route_deepspeed_loads(engine) -> None:
    """DeepSpeed's checkpoint reads (engine.load_checkpoint: its model, optimizer and ZeRO files) go
    through `load`: weights-only with the stand-ins, unless inside `trusting(True)`."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is not None:
        checkpoint_engine.load = lambda path, map_location=None: load(path, map_location=map_location or "cpu")
