"""LAtest Weight Averaging (Kaddour 2022; Sanyal et al. 2023): pure functions on tensors and shards.

Averaging is linear and ZeRO-3 partitions every parameter the same way at every step, so the
element-wise average of each rank's flat fp32 partitions is that rank's partition of the average
model: no rank ever needs the full weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from core.config import need


@dataclass
class LawaArgs:
    k: int = 5  # number of latest snapshots averaged
    spacing: int = 0  # minimum steps between averaged snapshots; 0: snapshot.every

    def validate(self) -> None:
        need(self.k >= 1, f"lawa.k: must be >= 1, got {self.k}")
        need(self.spacing >= 0, f"lawa.spacing: must be >= 0, got {self.spacing}")


def select_spaced(steps: Iterable[int], k: int, spacing: int) -> list[int]:
    """The newest step, then repeatedly the newest step at least `spacing` older than the last one
    taken, up to k steps; newest first. Fewer than k come back when the history is short."""
    chosen: list[int] = []
    for step in sorted(set(steps), reverse=True):
        if len(chosen) == k:
            break
        if not chosen or chosen[-1] - step >= spacing:
            chosen.append(step)
    return chosen


def average_tensors(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise mean in fp32 (accumulated in order: sum, then one division)."""
    if not tensors:
        raise ValueError("nothing to average")
    total = tensors[0].to(torch.float32, copy=True)
    for t in tensors[1:]:
        if t.shape != total.shape:
            raise ValueError(f"cannot average tensors of shapes {tuple(total.shape)} and {tuple(t.shape)}")
        total += t.to(torch.float32)
    return total.div_(len(tensors))


def average_shards(shards: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Average k shards, each a list of flat fp32 groups in the same layout."""
    if not shards:
        raise ValueError("nothing to average")
    groups = len(shards[0])
    if any(len(s) != groups for s in shards):
        raise ValueError(f"shards have different numbers of flat groups: {[len(s) for s in shards]}")
    return [average_tensors([s[g] for s in shards]) for g in range(groups)]


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average full (consolidated) state dicts key by key; the single-process reference."""
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            missing, extra = set(keys) - set(sd), set(sd) - set(keys)
            raise ValueError(f"state dict {i} has different keys (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    return {key: average_tensors([sd[key] for sd in state_dicts]) for key in keys}
