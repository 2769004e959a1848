"""Unpickling without running anyone's code.

A torch.save file is a pickle, and a plain `torch.load` runs whatever code the file names. Every
torch file this project reads goes through `load`: torch's weights-only unpickler (tensors,
containers, numbers, strings), plus the few plain DeepSpeed types that DeepSpeed's own checkpoints
hold (`DEEPSPEED_TYPES`: an enum and the loss-scaler records, which only store numbers). A file that
names anything else is refused in one line naming the file and what it names. Full pickle happens
only inside `trusting(True)`, where the user has said they trust the source (`checkpoint.trust_pickle`
for a job's init_from/growth source, `--trust-pickle` for the tools).

DeepSpeed's `load_checkpoint` calls torch.load with weights_only=False itself; `deepspeed_loads()`
holds those calls to the same rule while it is open.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import pickle
from typing import Any, Iterator, Optional

import torch

# What DeepSpeed 0.19's checkpoints hold besides tensors and containers, at ZeRO stages 0-3
# (torch.serialization.get_unsafe_globals_in_checkpoint on their files): an enum, and records of
# plain numbers, which their constructors only store.
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
    """Inside: `load` (and `deepspeed_loads`) unpickle in full when `trust` is true."""
    token = _trust.set(trust)
    try:
        yield
    finally:
        _trust.reset(token)


def _deepspeed_types() -> list[type]:
    from core.deepspeed_compat import use_deepspeed_here

    use_deepspeed_here()
    found = []
    for dotted in DEEPSPEED_TYPES:
        module, name = dotted.rsplit(".", 1)
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that type cannot be in its files
            pass
    return found


def _torch_load(path: str, mmap: bool, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=weights_only)
    except RuntimeError as e:
        if not mmap or ("mmap" not in str(e) and "zip" not in str(e)):
            raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)  # torch's legacy format


def _unsafe_names(path: str) -> list[str]:
    """The globals a torch file's pickle names that the weights-only unpickler does not allow."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip file (legacy format): the unpickler's own message says what it met
        return []


def load(path: str, mmap: bool = True, shown_as: Optional[str] = None) -> Any:
    """The object a torch.save file holds, unpickled weights-only (see the module's doc); tensors
    mapped from the file with `mmap` (paged in when touched). `shown_as`: the name errors give the
    file (e.g. when `path` is /proc/self/fd/N)."""
    name = shown_as or path
    if _trust.get():
        return _read(path, name, mmap, weights_only=False)
    try:
        return _read(path, name, mmap, weights_only=True)
    except UnsafePickle as refused:
        if not refused.names or not set(refused.names) <= set(DEEPSPEED_TYPES):
            raise
    with torch.serialization.safe_globals(_deepspeed_types()):  # a DeepSpeed checkpoint's own files
        return _read(path, name, mmap, weights_only=True)


def _read(path: str, name: str, mmap: bool, weights_only: bool) -> Any:
    try:
        return _torch_load(path, mmap, weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "Weights only load failed" in str(e):
            names = _unsafe_names(path)
            raise UnsafePickle(f"{name} holds Python objects besides tensors ({', '.join(names) or _first_line(e)}); "
                               f"refusing to unpickle it: {TRUST_HINT}", tuple(names)) from None
        raise PickleError(f"cannot read {name}: {_first_line(e)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated, or not a torch.save file
        if isinstance(e, FileNotFoundError):
            raise
        raise PickleError(f"cannot read {name}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextlib.contextmanager
def deepspeed_loads(where: str) -> Iterator[None]:
    """While open, DeepSpeed's own torch.load calls (engine.load_checkpoint) unpickle weights-only
    with DeepSpeed's plain types allowed, unless inside `trusting(True)`; a refusal names `where`."""
    if _trust.get():
        yield
        return
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it at every load, over the caller's argument
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_types()):
            yield
    except pickle.UnpicklingError as e:
        raise UnsafePickle(f"{where} holds Python objects besides tensors ({_first_line(e)}); refusing to "
                           f"unpickle it: {TRUST_HINT}") from None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
