"""Whole-model weights read tensor by tensor, never the whole model at once: the `TensorSource`
interface (names, full shapes, one full tensor, or a range of one rank's cut of it), the one way
to build a rank's flat fp32 groups from full weights under any ZeRO layout (`fill_flat_groups`),
and the reader for folders of ZeRO files of any stage (slots, averages, DeepSpeed checkpoint tags),
which also gives the one consolidation of such folders (`consolidate`).

A `ZeroFolder` maps every rank's files (torch.load with mmap: pages are read when touched), each
checked first against the record its folder keeps (core.integrity; a folder of another tool's,
which records nothing, is read as it is), and hands out one parameter at a time. A rank's own cut
under the source's tensor-parallel size is read from the bytes of the source partitions that overlap
it (core.flat_layout says which), so ranks of one node that load their cuts touch the source about
once between them; under another tensor-parallel size the full tensor is assembled once, cut and
dropped. Pages already consumed are given back to the kernel (`release_pages`), so a reader's
resident memory stays near one tensor, not the model.
"""
from __future__ import annotations

import abc
import ctypes
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from core.flat_layout import FlatLayout, LayoutMismatch, views, zero_padding
from core.run_dir import MANIFEST
from core.zero_checkpoint import (
    check_complete,
    flat_groups_of,
    layout_of,
    load_recorded,
    merge_tensors,
    read_manifest_file,
    recorded_files,
    split_tensor,
    tensor_parallel_layout_of,
)

# DeepSpeed's rank files: zero_pp_rank_{dp}_mp_rank_{tp}_{model|optim}_states.pt (bf16_ before the
# optimizer files of bf16 runs), and at ZeRO-0/1/2 mp_rank_{tp}_model_states.pt written by dp rank 0.
_RANK_FILE = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_(model|optim)_states\.pt$")


@dataclass(frozen=True)
class Cut:
    """Which piece of each full tensor one rank holds: its tensor-parallel slice (of `tp`), then its
    data-parallel rank's elements of that slice, flattened, under a ZeRO layout (core.flat_layout)."""

    dp_rank: int = 0
    dp: int = 1
    tp_rank: int = 0
    tp: int = 1


def tp_slice(tensor: torch.Tensor, split: Optional[list[int]], tp_rank: int, tp: int) -> torch.Tensor:
    """Tensor-parallel slice `tp_rank` of `tp` of a full tensor (`split`: the [dim, stride] it is
    split on; None when every tensor-parallel rank holds it whole)."""
    if split is None or tp == 1:
        return tensor
    return split_tensor(tensor, split[0], split[1], tp)[tp_rank]


class TensorSource(abc.ABC):
    """Full tensors by name, one at a time (in the dtype stored: fp32 for ZeRO folders).
    Subclasses give `names`, `shape` and `tensor`; `flat_range` cuts a range of a tensor-parallel
    slice, in fp32 (readers that can do better, e.g. ZeroFolder, override it)."""

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> torch.Size: ...

    @abc.abstractmethod
    def tensor(self, name: str) -> torch.Tensor: ...

    def flat_range(self, name: str, split: Optional[list[int]], tp_rank: int, tp: int, start: int,
                   stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor-parallel slice `tp_rank` of `tp` of tensor
        `name` (1-D fp32)."""
        return tp_slice(self.tensor(name), split, tp_rank, tp).reshape(-1)[start:stop].float()

    def close(self) -> None:
        """Drop what the reader holds open (maps, file handles); readers that hold none keep this."""
        return None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.tensor(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything at once: for small models and tests; streamed paths iterate `items`."""
        return dict(self.items())


def fill_flat_groups(source: TensorSource, layout: FlatLayout, cut: Cut, splits: dict[str, list[int]],
                     out: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
    """Rank `cut`'s fp32 flat groups of full weights under `layout` (written into `out` when given,
    e.g. an engine's own master partition; else new tensors of the layout's stored lengths), each
    parameter's elements read from the source as a range, padding zero. `splits`: {name: [dim,
    stride]} of the tensor-parallel splits."""
    if out is None:
        out = [torch.zeros(n, dtype=torch.float32) for n in layout.stored_lengths(cut.dp_rank)]
    for s in layout.spans(cut.dp_rank, [f.numel() for f in out]):
        split = splits.get(s.name) if cut.tp > 1 else None
        out[s.group][s.offset: s.offset + s.count].copy_(
            source.flat_range(s.name, split, cut.tp_rank, cut.tp, s.start, s.start + s.count))
    zero_padding(out, layout, cut.dp_rank)
    return out


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
# ZeRO folders


class ZeroFolder(TensorSource):
    """The fp32 weights of a folder of ZeRO files (stage 1, 2 or 3; any data × tensor layout), read lazily."""

    def __init__(self, folder: str):
        self.folder = folder = os.path.abspath(folder)
        check_complete(folder)
        self.records = recorded_files(folder)
        self.optim: dict[tuple[int, int], str] = {}
        model: dict[tuple[int, int], str] = {}
        for name in os.listdir(folder):
            match = _RANK_FILE.search(name)
            if match:
                rank = (int(match.group(1) or 0), int(match.group(2)))
                (self.optim if match.group(3) == "optim" else model)[rank] = os.path.join(folder, name)
        if not self.optim:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed *_optim_states.pt files")
        self.dp = 1 + max(dp for dp, _ in self.optim)
        self.tp = 1 + max(tp for _, tp in self.optim)
        missing = [f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in range(self.dp) for t in range(self.tp)
                   if (d, t) not in self.optim] + \
                  [f"mp_rank_{t:02d}_model_states.pt" for t in range(self.tp) if (0, t) not in model]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {missing[0]}" + (f" (and {len(missing) - 1} more files)"
                                                                      if len(missing) > 1 else ""))
        states = self._load(model[(0, 0)])
        self.param_shapes = states["param_shapes"]
        self.slice_shapes = {n: torch.Size(s) for group in self.param_shapes for n, s in group.items()}
        buffers = set(states.get("buffer_names") or [])
        self.buffers = {n: t for n, t in states["module"].items() if n in buffers}
        self.shared = dict(states.get("shared_params") or {})  # alias -> the parameter it is
        splits = tensor_parallel_layout_of(folder) if self.tp > 1 else {}
        if splits is None:
            raise LayoutMismatch(f"{folder} has {self.tp} tensor-parallel ranks but records no "
                                 "tensor_parallel_layout: cannot tell which dimension each parameter was split on")
        self.splits: dict[str, list[int]] = splits
        self._views: dict[tuple[int, int], dict[str, tuple[torch.Tensor, int]]] = {}
        self.layout = self._flat_layout()

    def _flat_layout(self) -> FlatLayout:
        """From the slot's manifest (an ema/ or swa/ folder's slot's) when it has one, else from rank 0's files."""
        for place in (self.folder, os.path.dirname(self.folder)):
            if os.path.isfile(os.path.join(place, MANIFEST)):
                manifest = read_manifest_file(place)
                if manifest.zero_stage == 3 or manifest.partition_sizes:
                    return FlatLayout(manifest.zero_stage, self.dp, self.param_shapes, manifest.param_paddings,
                                      manifest.partition_sizes)
        return layout_of(self.param_shapes, self.dp, self._load(self.optim[(0, 0)])["optimizer_state_dict"])

    def _load(self, path: str) -> Any:
        return load_recorded(path, self.records)

    def __repr__(self) -> str:
        return f"ZeroFolder({self.folder!r}, ZeRO-{self.layout.stage}, data {self.dp} × tensor {self.tp})"

    def partitions(self, dp_rank: int, tp_rank: int) -> dict[str, tuple[torch.Tensor, int]]:
        """Rank (dp_rank, tp_rank)'s elements of every parameter it holds, by name: (a view of its
        mapped file, the first element of the parameter it holds)."""
        key = (dp_rank, tp_rank)
        if key not in self._views:
            self._views[key] = views(flat_groups_of(self._load(self.optim[key])), self.layout, dp_rank)
        return self._views[key]

    def names(self) -> list[str]:
        return list(self.slice_shapes) + list(self.buffers) + [a for a in self.shared if a not in self.slice_shapes]

    def shape(self, name: str) -> torch.Size:
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name].shape
        shape = list(self.slice_shapes[name])
        if name in self.splits:
            shape[self.splits[name][0]] *= self.tp
        return torch.Size(shape)

    def _slice_flat(self, name: str, tp_rank: int, start: int, stop: int) -> torch.Tensor:
        """Elements start:stop of the flattened tensor-parallel slice `tp_rank` of `name`, copied out
        of the data-parallel partitions that hold them."""
        out = torch.empty(stop - start, dtype=torch.float32)
        for r, first, count in self.layout.holders(name, start, stop):
            held, held_start = self.partitions(r, tp_rank)[name]
            source = held[first - held_start: first - held_start + count]
            out[first - start: first - start + count] = source
            release_pages(source)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        name = self.shared.get(name, name)
        if name in self.buffers:
            return self.buffers[name].clone()
        shape = self.slice_shapes[name]
        ranks = range(self.tp) if name in self.splits else [0]  # others are replicated on every TP rank
        slices = [self._slice_flat(name, t, 0, shape.numel()).view(shape) for t in ranks]
        return merge_tensors(slices, *self.splits[name]) if len(slices) > 1 else slices[0]

    def flat_range(self, name: str, split: Optional[list[int]], tp_rank: int, tp: int, start: int,
                   stop: int) -> torch.Tensor:
        name = self.shared.get(name, name)
        wanted = list(split) if split is not None and tp > 1 else None
        held = self.splits.get(name) if self.tp > 1 else None
        if name in self.buffers or wanted != held or (wanted is not None and tp != self.tp):
            return super().flat_range(name, split, tp_rank, tp, start, stop)
        # A slice the folder holds as it is: read just those elements.
        return self._slice_flat(name, tp_rank if held else 0, start, stop)

    def close(self) -> None:
        self._views.clear()  # the maps go with their last views


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a slot, average or ZeRO checkpoint tag folder (any stage), in
    DeepSpeed's order (zero_to_fp32's result, with tensor-parallel slices merged along the recorded
    dimensions)."""
    source = ZeroFolder(folder)
    try:
        return source.state_dict()
    finally:
        source.close()
