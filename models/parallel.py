"""The TP x DP layout of a process group, and the `mpu` object DeepSpeed asks for.

Tensor-parallel ranks are consecutive (rank = dp_rank * tp + tp_rank), so with one task per GPU a
tensor-parallel group stays inside a node, on NVLink. Trainers and the LAWA sidecar build their
layouts with the same function, so a sidecar rank holds exactly its trainer rank's shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class Parallel:
    """This process's place in the TP x DP layout; also the `mpu` object DeepSpeed asks for."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    tp_group: Optional[dist.ProcessGroup]  # None when tp == 1: the model then skips all TP comms
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup  # the TP group, always a real group, for DeepSpeed
    ctrl_group: dist.ProcessGroup  # all ranks, gloo: small CPU-side votes that never touch the GPU
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The methods DeepSpeed calls on an `mpu`.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.mp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group


def build_parallel(tensor_parallel: int, local_rank: int, device: torch.device) -> Parallel:
    """Collective, after init_process_group: build the TP and DP groups of the current world."""
    world, rank = dist.get_world_size(), dist.get_rank()
    tp = tensor_parallel
    if world % tp != 0:
        raise ValueError(f"world size {world} is not divisible by tensor parallel size {tp}")
    dp = world // tp
    tp_rank, dp_rank = rank % tp, rank // tp
    # Every rank must create every group, in the same order.
    mp_group = dp_group = None
    for d in range(dp):
        group = dist.new_group([d * tp + t for t in range(tp)])
        if d == dp_rank:
            mp_group = group
    for t in range(tp):
        group = dist.new_group([d * tp + t for d in range(dp)])
        if t == tp_rank:
            dp_group = group
    ctrl_group = dist.new_group(backend="gloo")
    return Parallel(rank=rank, world_size=world, local_rank=local_rank, tp=tp, dp=dp, tp_rank=tp_rank,
                    dp_rank=dp_rank, tp_group=mp_group if tp > 1 else None, dp_group=dp_group,
                    mp_group=mp_group, ctrl_group=ctrl_group, device=device)
