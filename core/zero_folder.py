"""Whole-model weights read tensor by tensor, never the whole model at once: the `TensorSource`
interface (names, full shapes, one full tensor, or one rank's cut of it) and its reader for
folders of ZeRO-3 files (slots, averages, checkpoint tags), which also gives the one
consolidation of such folders (`consolidate`).

A `ZeroFolder` maps every rank's files (torch.load with mmap: pages are read when touched), each
checked first against the record its folder keeps (core.integrity; a folder of another tool's,
which records nothing, is read as it is), and
hands out one parameter at a time. A rank's own partition (`Cut`) under the source's tensor-parallel
size is read from the bytes of the source partitions that overlap it, so ranks of one node that load
their cuts touch the source about once between them; under another tensor-parallel size the full
tensor is assembled once, cut and dropped. Pages already consumed are given back to the kernel
(`release_pages`), so a reader's resident memory stays near one tensor, not the model.
"""
from __future__ import annotations

import abc
import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from core.zero_checkpoint import (
    LayoutMismatch,
    check_complete,
    load_recorded,
    merge_tensors,
    partition_numel,
    recorded_files,
    split_partitions,
    split_tensor,
    tensor_parallel_layout_of,
)

_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass(frozen=True)
class Cut:
    """Which piece of each full tensor one rank holds: its tensor-parallel slice (`split`: the
    [dim, stride] the tensor is split on, None when every tensor-parallel rank holds it whole),
    then its data-parallel partition of that slice, flattened (ceil(numel / dp) elements, zero padded)."""

    dp_rank: int = 0
    dp: int = 1
    tp_rank: int = 0
    tp: int = 1


def tp_slice(tensor: torch.Tensor, split: Optional[list[int]], cut: Cut) -> torch.Tensor:
    """This cut's tensor-parallel slice of a full tensor."""
    if split is None or cut.tp == 1:
        return tensor
    return split_tensor(tensor, split[0], split[1], cut.tp)[cut.tp_rank]


def dp_partition(flat: torch.Tensor, cut: Cut) -> torch.Tensor:
    """This cut's data-parallel partition of a flattened slice, zero padded to ceil(numel / dp)."""
    part = partition_numel(flat.numel(), cut.dp)
    piece = flat[cut.dp_rank * part: (cut.dp_rank + 1) * part]
    out = torch.zeros(part, dtype=torch.float32)
    out[: piece.numel()] = piece
    return out


class TensorSource(abc.ABC):
    """Full tensors by name, one at a time (in the dtype stored: fp32 for ZeRO-3 folders).
    Subclasses give `names`, `shape` and `tensor`; `piece` cuts a tensor for one rank, in fp32
    (readers that can do better, e.g. ZeroFolder, override it)."""

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> torch.Size: ...

    @abc.abstractmethod
    def tensor(self, name: str) -> torch.Tensor: ...

    def piece(self, name: str, split: Optional[list[int]], cut: Cut) -> torch.Tensor:
        """One rank's cut of tensor `name`: its partition of its tensor-parallel slice (1-D fp32)."""
        return dp_partition(tp_slice(self.tensor(name), split, cut).reshape(-1), cut)

    def close(self) -> None:
        """Drop what the reader holds open (maps, file handles); readers that hold none keep this."""
        return None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything at once: for small models and tests; streamed paths iterate `items`."""
        return dict(self.items())


class StateDictSource(TensorSource):
    """A state dict already in memory, behind the same interface."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.held = state_dict

    def names(self) -> list[str]:
        return list(self.held)

    def shape(self, name: str) -> torch.Size:
        return self.held[name].shape

    def tensor(self, name: str) -> torch.Tensor:
        return self.held[name].detach()


@torch.no_grad()
def load_module(module: torch.nn.Module, source: TensorSource) -> None:
    """A whole single-process model's weights, tensor by tensor (never a second full copy beside it)."""
    own = module.state_dict()
    have = set(source.names())
    missing = [name for name in own if name not in have]
    if missing:
        raise ValueError(f"the weights have no {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                                 else "") + ": a different model?")
    for name, tensor in own.items():
        value = source.tensor(name)
        if value.shape != tensor.shape:
            raise ValueError(f"{name} is {tuple(value.shape)} in the weights, the model's is {tuple(tensor.shape)}")
        tensor.copy_(value)
    source.close()


# ---------------------------------------------------------------------------------------------
# giving consumed pages of a mapped file back

_libc = None
_MADV_DONTNEED = 4  # Linux


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the pages wholly inside a file-mapped tensor from this process (madvise DONTNEED on a
    private read-only mapping: the next touch reads the file again). A no-op off Linux. Only for
    tensors of mapped files: on ordinary memory it would zero the pages."""
    global _libc
    if not tensor.is_cpu or os.uname().sysname != "Linux":
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 folders


class ZeroFolder(TensorSource):
    """The fp32 weights of a folder of ZeRO-3 files (any data × tensor layout), read lazily."""

    def __init__(self, folder: str):
        self.folder = folder = os.path.abspath(folder)
        check_complete(folder)
        self.records = recorded_files(folder)
        self.files: dict[tuple[int, int], dict[str, str]] = {}
        for name in os.listdir(folder):
            match = _RANK_FILE.search(name)
            if match:
                rank = (int(match.group(1)), int(match.group(2)))
                self.files.setdefault(rank, {})[match.group(3)] = os.path.join(folder, name)
        if not self.files:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed *_model_states.pt / *_optim_states.pt files")
        self.dp = 1 + max(dp for dp, _ in self.files)
        self.tp = 1 + max(tp for _, tp in self.files)
        missing = [f"zero_pp_rank_{d}_mp_rank_{t:02d}_{kind}_states.pt" for d in range(self.dp)
                   for t in range(self.tp) for kind in ("model", "optim") if kind not in self.files.get((d, t), {})]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing[0]}" + (f" (and {len(missing) - 1} more files)"
                                                                      if len(missing) > 1 else ""))
        states = self._load(self.files[(0, 0)]["model"])
        self.param_shapes = states["param_shapes"]
        self.slice_shapes = {n: torch.Size(s) for group in self.param_shapes for n, s in group.items()}
        buffers = set(states.get("buffer_names") or [])
        self.buffers = {n: t for n, t in states["module"].items() if n in buffers}
        self.shared = dict(states.get("shared_params") or {})  # alias -> the parameter it is
        layout = tensor_parallel_layout_of(folder) if self.tp > 1 else {}
        if layout is None:
            raise LayoutMismatch(f"{folder} has {self.tp} tensor-parallel ranks but records no "
                                 "tensor_parallel_layout: cannot tell which dimension each parameter was split on")
        self.layout: dict[str, list[int]] = layout
        self._partitions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def _load(self, path: str) -> Any:
        return load_recorded(path, self.records)

    def __repr__(self) -> str:
        return f"ZeroFolder({self.folder!r}, data {self.dp} × tensor {self.tp})"

    def partitions(self, dp_rank: int, tp_rank: int) -> dict[str, torch.Tensor]:
        """Rank (dp_rank, tp_rank)'s partition of every parameter, by name (views of its mapped file)."""
        key = (dp_rank, tp_rank)
        if key not in self._partitions:
            optim = self._load(self.files[key]["optim"])["optimizer_state_dict"]
            self._partitions[key] = split_partitions(optim["fp32_flat_groups"], self.param_shapes, self.dp)
        return self._partitions[key]

    def names(self) -> list[str]:
        return list(self.slice_shapes) + list(self.buffers) + [a for a in self.shared if a not in self.slice_shapes]

    def shape(self, name: str) -> torch.Size:
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name].shape
        shape = list(self.slice_shapes[name])
        if name in self.layout:
            shape[self.layout[name][0]] *= self.tp
        return torch.Size(shape)

    def _slice_flat(self, name: str, tp_rank: int, start: int, stop: int) -> torch.Tensor:
        """Elements start:stop of the flattened tensor-parallel slice `tp_rank` of `name`, copied out
        of the data-parallel partitions that hold them."""
        part = partition_numel(self.slice_shapes[name].numel(), self.dp)
        out = torch.empty(stop - start, dtype=torch.float32)
        for r in range(start // part, min(self.dp, -(-stop // part))):
            lo, hi = max(start, r * part), min(stop, (r + 1) * part)
            source = self.partitions(r, tp_rank)[name][lo - r * part: hi - r * part]
            out[lo - start: hi - start] = source
            release_pages(source)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name].clone()
        shape = self.slice_shapes[name]
        ranks = range(self.tp) if name in self.layout else [0]  # others are replicated on every TP rank
        slices = [self._slice_flat(name, t, 0, shape.numel()).view(shape) for t in ranks]
        return merge_tensors(slices, *self.layout[name]) if len(slices) > 1 else slices[0]

    def piece(self, name: str, split: Optional[list[int]], cut: Cut) -> torch.Tensor:
        name = self.shared.get(name, name)
        wanted = list(split) if split is not None and cut.tp > 1 else None
        held = self.layout.get(name) if self.tp > 1 else None
        if name in self.buffers or wanted != held or (wanted is not None and cut.tp != self.tp):
            return super().piece(name, split, cut)
        # This rank's slice is one the source holds: read just the elements of its partition.
        numel = self.slice_shapes[name].numel()
        part = partition_numel(numel, cut.dp)
        start = min(cut.dp_rank * part, numel)
        stop = min(start + part, numel)
        out = torch.zeros(part, dtype=torch.float32)
        out[: stop - start] = self._slice_flat(name, cut.tp_rank if held else 0, start, stop)
        return out

    def close(self) -> None:
        self._partitions.clear()  # the maps go with their last views


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a slot, average or ZeRO-3 checkpoint tag folder, in DeepSpeed's
    order (zero_to_fp32's result, with tensor-parallel slices merged along the recorded dimensions)."""
    source = ZeroFolder(folder)
    try:
        return source.state_dict()
    finally:
        source.close()
