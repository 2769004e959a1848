"""How DeepSpeed cuts the fp32 master weights among data-parallel ranks, at each ZeRO stage: the one
description of each stage's partition layout. Every reader and writer of a rank's flat groups (the
snapshot writer, the sidecar, checkpoints read for init_from/growth/export, offline averaging)
walks it through `FlatLayout.spans`.

- ZeRO-3 chunks every parameter: rank r holds elements [r·c, (r+1)·c) of each, c = ceil(numel/dp),
  the chunks of a parameter group back to back in `param_shapes` order (DeepSpeed may cut a group into
  several flat sub-groups; a chunk never straddles two). The tail of the last chunk past the
  parameter's end is padding DeepSpeed leaves uninitialised.
- ZeRO-1/2 flatten each parameter group (parameters back to back in `param_shapes` order, each but the
  last followed by `param_paddings` zeros), pad it to dp equal partitions of `partition_sizes[g]`
  elements, and give rank r partition r: one contiguous span that cuts across parameters. DeepSpeed's
  checkpoints, and our slots, store it without the group's tail padding ("lean").

Element-wise averaging of the same rank's flat groups is exact under either layout, since the
layout is the same at every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch


class LayoutMismatch(ValueError):
    """Partitions, shapes or layouts that do not fit together."""


def chunk_numel(numel: int, dp: int) -> int:
    """ZeRO-3 gives every rank ceil(numel / dp) elements of each parameter; the last ones pad."""
    return math.ceil(numel / dp)


@dataclass(frozen=True)
class Span:
    """Elements [start, start + count) of parameter `name` (flattened; its tensor-parallel slice)
    sit at [offset, offset + count) of flat group `group` on a rank."""

    name: str
    group: int
    offset: int
    start: int
    count: int


@dataclass
class FlatLayout:
    stage: int  # 3, or 1/2 (the same layout: ZeRO-2 also partitions the gradients)
    dp: int
    param_shapes: list[dict[str, Any]]  # DeepSpeed's: one ordered name -> shape dict per parameter group
    param_paddings: list[list[int]] = field(default_factory=list)  # stage 1-2: zeros after each parameter
    partition_sizes: list[int] = field(default_factory=list)  # stage 1-2: each group's elements per rank

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise LayoutMismatch(f"ZeRO stage {self.stage}: snapshots and ZeRO folders need stage 1, 2 or 3")
        self._numel = {n: math.prod(s) for shapes in self.param_shapes for n, s in shapes.items()}
        if self.stage < 3:
            if len(self.param_paddings) != len(self.param_shapes) or len(self.partition_sizes) != len(self.param_shapes):
                raise LayoutMismatch(f"a ZeRO-{self.stage} layout needs paddings and a partition size for each of "
                                     f"its {len(self.param_shapes)} parameter groups")
            self._offset: dict[str, tuple[int, int]] = {}
            self._group_numel = []
            for g, (shapes, pads) in enumerate(zip(self.param_shapes, self.param_paddings)):
                offset = 0
                for (name, shape), pad in zip(shapes.items(), pads):
                    self._offset[name] = (g, offset)
                    offset += math.prod(shape) + pad
                self._group_numel.append(offset)
                if self.partition_sizes[g] * self.dp < offset:
                    raise LayoutMismatch(f"parameter group {g} holds {offset} elements, more than {self.dp} partitions "
                                         f"of {self.partition_sizes[g]}")

    @classmethod
    def zero3(cls, param_shapes: list[dict[str, Any]], dp: int) -> FlatLayout:
        return cls(3, dp, param_shapes)

    @classmethod
    def zero12(cls, stage: int, param_shapes: list[dict[str, Any]], dp: int) -> FlatLayout:
        """As DeepSpeed 0.19 lays a group out without parameter alignment: no paddings between
        parameters, the group padded to a multiple of 2·dp elements (its nccl_start_alignment_factor
        of 2 times dp), cut in dp equal partitions. (A live engine's own layout comes from it:
        core.deepspeed_compat.flat_layout.)"""
        sizes = []
        for shapes in param_shapes:
            numel = sum(math.prod(s) for s in shapes.values())
            sizes.append(math.ceil(numel / (2 * dp)) * 2)
        return cls(stage, dp, param_shapes, [[0] * len(shapes) for shapes in param_shapes], sizes)

    def numel(self, name: str) -> int:
        return self._numel[name]

    def names(self) -> list[str]:
        return list(self._numel)

    def stored_lengths(self, rank: int) -> list[int]:
        """Each flat group's length on `rank` as stored: ZeRO-3 one group per parameter group (as
        this project writes them), ZeRO-1/2 lean (without the group's tail padding)."""
        if self.stage == 3:
            return [sum(chunk_numel(math.prod(s), self.dp) for s in shapes.values()) for shapes in self.param_shapes]
        return [max(0, min(p, n - rank * p)) for n, p in zip(self._group_numel, self.partition_sizes)]

    def spans(self, rank: int, lengths: Optional[list[int]] = None) -> list[Span]:
        """Where each parameter's elements held by `rank` sit in its flat groups, whose lengths are
        `lengths` (default `stored_lengths`); LayoutMismatch when they do not fit the shapes."""
        lengths = self.stored_lengths(rank) if lengths is None else lengths
        return self._zero3_spans(rank, lengths) if self.stage == 3 else self._zero12_spans(rank, lengths)

    def _zero3_spans(self, rank: int, lengths: list[int]) -> list[Span]:
        out, g, offset = [], 0, 0
        for shapes in self.param_shapes:
            for name in shapes:
                numel = self._numel[name]
                part = chunk_numel(numel, self.dp)
                while g < len(lengths) and offset + part > lengths[g]:
                    if offset != lengths[g]:
                        raise LayoutMismatch(f"{name}'s partition of {part} elements straddles flat group {g} "
                                             f"({lengths[g]} elements, {offset} used)")
                    g, offset = g + 1, 0
                if g == len(lengths):
                    raise LayoutMismatch(f"flat groups of {lengths} elements end before {name}: the parameter shapes "
                                         f"need more at data-parallel size {self.dp}")
                start = rank * part
                out.append(Span(name, g, offset, start, max(0, min(part, numel - start))))
                offset += part
        used = sum(lengths[:g]) + offset
        if used != sum(lengths):
            raise LayoutMismatch(f"flat groups hold {sum(lengths)} elements but the parameter shapes at "
                                 f"data-parallel size {self.dp} account for {used}")
        return out

    def _zero12_spans(self, rank: int, lengths: list[int]) -> list[Span]:
        if len(lengths) != len(self.param_shapes):
            raise LayoutMismatch(f"{len(lengths)} flat groups for {len(self.param_shapes)} parameter groups")
        out = []
        for g, shapes in enumerate(self.param_shapes):
            size = self.partition_sizes[g]
            if lengths[g] not in (size, self.stored_lengths(rank)[g]):
                raise LayoutMismatch(f"flat group {g} of rank {rank} holds {lengths[g]} elements; its partition is "
                                     f"{size} ({self.stored_lengths(rank)[g]} without the padding)")
            lo, hi = rank * size, rank * size + lengths[g]
            for name in shapes:
                _, offset = self._offset[name]
                first, last = max(lo, offset), min(hi, offset + self._numel[name])
                if first < last:
                    out.append(Span(name, g, first - lo, first - offset, last - first))
        return out

    def padding(self, rank: int, lengths: list[int]) -> list[tuple[int, int, int]]:
        """(group, start, stop) of every run of elements on `rank` that belongs to no parameter."""
        taken: dict[int, list[tuple[int, int]]] = {g: [] for g in range(len(lengths))}
        for s in self.spans(rank, lengths):
            taken[s.group].append((s.offset, s.offset + s.count))
        out = []
        for g, runs in taken.items():
            cursor = 0
            for start, stop in sorted(runs):
                if start > cursor:
                    out.append((g, cursor, start))
                cursor = max(cursor, stop)
            if cursor < lengths[g]:
                out.append((g, cursor, lengths[g]))
        return out

    def holders(self, name: str, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(rank, first element, count) of each rank holding part of elements [start, stop) of `name`."""
        if self.stage == 3:
            part = chunk_numel(self._numel[name], self.dp)
            ranks = range(start // part, min(self.dp, -(-stop // part)))
            bounds = [(r, r * part, (r + 1) * part) for r in ranks]
        else:
            g, offset = self._offset[name]
            size = self.partition_sizes[g]
            ranks = range((offset + start) // size, min(self.dp, -(-(offset + stop) // size)))
            bounds = [(r, r * size - offset, (r + 1) * size - offset) for r in ranks]
        return [(r, max(start, lo), min(stop, hi) - max(start, lo)) for r, lo, hi in bounds if min(stop, hi) > max(start, lo)]

    def place(self, name: str) -> tuple[int, int]:
        """ZeRO-1/2: (group, offset) of a parameter in its group's whole flat."""
        return self._offset[name]

    def whole_groups(self, partitions: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """ZeRO-1/2: each group's whole flat from every rank's flat groups (`partitions[rank][group]`,
        stored lean or padded), in rank order."""
        return [torch.cat([p[g] for p in partitions])[: self._group_numel[g]] for g in range(len(self.param_shapes))]

    def stored(self, flat_groups: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
        """A rank's flat groups as files keep them: ZeRO-3's as they are, ZeRO-1/2's without the tail padding."""
        if self.stage == 3:
            return flat_groups
        return [f[:n] for f, n in zip(flat_groups, self.stored_lengths(rank))]

    def to_json(self) -> dict[str, Any]:
        """What a manifest records of a stage-1/2 layout (stage 3 needs only the shapes and dp)."""
        return {"zero_stage": self.stage, "param_paddings": self.param_paddings, "partition_sizes": self.partition_sizes}


def views(flat_groups: list[torch.Tensor], layout: FlatLayout, rank: int) -> dict[str, tuple[torch.Tensor, int]]:
    """Each parameter's elements held by `rank`: a view of its flat groups, and the first element it holds."""
    return {s.name: (flat_groups[s.group][s.offset: s.offset + s.count], s.start)
            for s in layout.spans(rank, [f.numel() for f in flat_groups])}


def zero_padding(flat_groups: list[torch.Tensor], layout: FlatLayout, rank: int) -> None:
    """Zero, in place, every element of `rank`'s flat groups that belongs to no parameter. ZeRO-3
    leaves its chunk tails uninitialised (values up to 1e33 have been seen), which poisons any norm,
    finiteness check or average taken over the flat tensors."""
    for g, start, stop in layout.padding(rank, [f.numel() for f in flat_groups]):
        flat_groups[g][start:stop].zero_()
