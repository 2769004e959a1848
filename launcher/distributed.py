"""Distributed setup in one place: rank discovery, TP x DP process groups, and DeepSpeed's `mpu`.

Rank layout: tensor-parallel ranks are consecutive (rank = dp_rank * tp + tp_rank), so with one
task per GPU a tensor-parallel group stays inside a node, on NVLink.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelArgs:
    tensor: int = 1  # Megatron-style tensor-parallel size; data-parallel size = world / tensor
    zero_stage: int = 3  # DeepSpeed ZeRO stage


@dataclass
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # which launcher's variables were read


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def rank_env(environ: Optional[dict] = None) -> RankEnv:
    """Rank, world and rendezvous from torchrun / the DeepSpeed launcher, or Slurm, or a lone process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return RankEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       addr, port, "slurm")
    return RankEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


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


def init_distributed(tensor_parallel: int) -> Parallel:
    """Join the process group and build the TP and DP groups. The caller has checked the layout."""
    import deepspeed

    env = rank_env()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"local rank {env.local_rank} has no GPU: this node shows {torch.cuda.device_count()} "
                             f"(start one process per GPU, e.g. torchrun --nproc_per_node {torch.cuda.device_count()})")
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)

    tp = tensor_parallel
    dp = env.world_size // tp
    tp_rank, dp_rank = env.rank % tp, env.rank // tp
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
    return Parallel(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, tp=tp, dp=dp,
                    tp_rank=tp_rank, dp_rank=dp_rank, tp_group=mp_group if tp > 1 else None,
                    dp_group=dp_group, mp_group=mp_group, device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
