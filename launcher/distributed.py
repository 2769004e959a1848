"""Distributed setup in one place: rank discovery from the launcher's environment, device choice,
process-group init; the TP x DP layout itself is models.parallel's."""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch
import torch.distributed as dist

from models.parallel import Parallel, build_parallel


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


def _mpi_master_addr(env: dict) -> str:
    """Rank 0's host, told to every rank through MPI (mpi4py); loopback when all share one host."""
    if env.get("OMPI_COMM_WORLD_LOCAL_SIZE") == env.get("OMPI_COMM_WORLD_SIZE"):
        return "127.0.0.1"
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)


def rank_env(environ: Optional[dict] = None) -> RankEnv:
    """Rank, world and rendezvous from torchrun / the DeepSpeed launcher, mpirun, Slurm's srun, or a
    lone process, in that order (mpirun inside a Slurm allocation also sets SLURM_* variables)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher
        return RankEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun (Open MPI)
        return RankEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR") or _mpi_master_addr(env), int(env.get("MASTER_PORT", 29500)), "mpi")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun, one task per GPU
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env["SLURM_JOB_NODELIST"])
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000))
        return RankEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       addr, port, "slurm")
    return RankEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 29500)), "single")


def init_distributed(tensor_parallel: int) -> Parallel:
    """Join the process group and build the TP x DP layout. The caller has checked the layout."""
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

    return build_parallel(tensor_parallel, env.local_rank, device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def exit_process(code: int) -> NoReturn:
    """Destroy the process groups and leave without the interpreter's teardown.

    A Gloo worker thread frees a finished collective's tensors just after the caller has its
    result; when that happens while the interpreter is finalizing, the thread cannot take the GIL
    and the process aborts ("terminate called without an active exception", about one sidecar exit
    in four on 2 CPU cores). Every file this project writes is closed and fsynced before its entry
    point returns, so skipping the teardown loses nothing.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
