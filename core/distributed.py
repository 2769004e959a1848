"""Process groups in one place: rank discovery from whichever launcher started us, the TP x DP
layout (validated once, by its owner, before anything starts), group setup, and a clean exit.

Tensor-parallel ranks are consecutive (rank = dp_rank * tp + tp_rank), so with one task per GPU a
tensor-parallel group stays inside a node, on NVLink. Trainers and the LAWA sidecar build their
layouts with the same function, so a sidecar rank holds exactly its trainer rank's shard.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, NoReturn, Optional

import torch
import torch.distributed as dist

from core.config import ConfigError, need
from core.deepspeed_compat import use_deepspeed
from core.log import logger, rank_span


@dataclass
class ParallelArgs:
    tensor: int = 1  # Megatron-style tensor-parallel size; data-parallel size = world / tensor
    # DeepSpeed ZeRO stage: 1 partitions the optimizer state (Megatron's distributed optimizer; Pythia
    # trained so), 2 the gradients too, 3 the weights too; auto: the lowest whose plan fits this
    # machine (launcher/plan.py; the start-up block says which and why).
    zero_stage: Literal["auto", 1, 2, 3] = "auto"
    # Bucket (and at ZeRO-3 prefetch) sizes: DeepSpeed's defaults, or sized from the model's width
    # (auto: reduce bucket d², ZeRO-3 prefetch 0.9·d² and parameters under 10·d elements kept whole).
    zero_buckets: Literal["default", "auto"] = "default"
    # A rank that hears nothing from its peer (or the rendezvous store) this long stops the job with
    # one line (exit code 75) instead of waiting out the collectives' 30-minute timeout; 0: off.
    heartbeat_timeout_s: float = 120.0

    def validate(self) -> None:
        need(self.tensor >= 1, f"parallel.tensor: must be >= 1, got {self.tensor}")
        need(self.heartbeat_timeout_s == 0 or self.heartbeat_timeout_s >= 2,
             f"parallel.heartbeat_timeout_s: must be 0 (off) or >= 2 seconds, got {self.heartbeat_timeout_s}")

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel size of a world of this many ranks."""
        if world_size % self.tensor != 0:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor={self.tensor}")
        return world_size // self.tensor


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
    hosts: list[str] = field(default_factory=list)  # every rank's node (hostname), by rank
    addresses: list[str] = field(default_factory=list)  # every rank's address, as its peers reach it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def host(self) -> str:
        return self.hosts[self.rank]

    @property
    def node_ranks(self) -> list[int]:
        """The ranks on this rank's node."""
        return self.ranks_on(self.host)

    @property
    def is_node_first(self) -> bool:
        """The lowest rank of its node: the one that acts for the node (node-local files)."""
        return self.node_ranks[0] == self.rank

    def ranks_on(self, host: str) -> list[int]:
        return [r for r, h in enumerate(self.hosts) if h == host]

    def describe_ranks(self, ranks: list[int]) -> str:
        """e.g. 'ranks 2-3 on node2' or 'rank 5 on gpu-17'."""
        hosts = sorted({self.hosts[r] for r in ranks}, key=lambda h: self.hosts.index(h))
        return f"{rank_span(ranks)} on {', '.join(hosts)}"

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


def build_parallel(tp: int, local_rank: int, device: torch.device) -> Parallel:
    """Collective, after the process group is up: the TP and DP groups of the current world,
    whose size the caller has checked divides by `tp`."""
    world, rank = dist.get_world_size(), dist.get_rank()
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
    placement = gather_objects((socket.gethostname(), host_address()), ctrl_group)
    par = Parallel(rank=rank, world_size=world, local_rank=local_rank, tp=tp, dp=dp, tp_rank=tp_rank,
                   dp_rank=dp_rank, tp_group=mp_group if tp > 1 else None, dp_group=dp_group,
                   mp_group=mp_group, ctrl_group=ctrl_group, device=device,
                   hosts=[h for h, _ in placement], addresses=[a for _, a in placement])
    split = [d for d in range(dp) if len({par.hosts[d * tp + t] for t in range(tp)}) > 1]
    if split and rank == 0:
        logger.warning(f"warning: tensor-parallel group {split[0]} spans nodes "
                       f"({par.describe_ranks([split[0] * tp + t for t in range(tp)])}): every layer's "
                       f"all-reduce crosses the network; give each node a multiple of parallel.tensor={tp} ranks")
    return par


def host_address() -> str:
    """This host's address as its name resolves (what gloo announces to peers), or '?'."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "?"


def pick_device(local_rank: int, want: str = "auto") -> torch.device:
    """The GPU of this local rank when there is one (or `want` says cuda), else the CPU. A process
    that sees a single GPU takes it, whatever its local rank: Slurm's --gpus-per-task=1 or
    --gpu-bind=single:1 (and a per-process CUDA_VISIBLE_DEVICES) bind each task to its own."""
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("a GPU was asked for, but none is visible to this process")
    visible = torch.cuda.device_count()
    index = 0 if visible == 1 else local_rank
    if index >= visible:
        raise ConfigError(f"local rank {local_rank} has no GPU: this process sees {visible} "
                          f"(start one process per GPU, e.g. torchrun --nproc_per_node {visible}, or srun "
                          f"--ntasks-per-node equal to --gpus-per-node)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(tp: int, env: Optional[RankEnv] = None, device: str = "auto") -> Parallel:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and build the TP x DP layout."""
    env = env or rank_env()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    chosen = pick_device(env.local_rank, device)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart is not None and not dist.is_initialized():
        # torchrun's agent keeps one store across its worker restarts (--max-restarts), and the
        # process group's keys carry no attempt: restarted workers would read the dead ones'
        # addresses and fail to connect, or hang. Each attempt gets keys of its own.
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"lawa/attempt_{restart}", store), rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(minutes=30))
    use_deepspeed(chosen.type).init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               verbose=False)
    unlink_cpu_allreduce_buffer()
    return build_parallel(tp, env.local_rank, chosen)


def unlink_cpu_allreduce_buffer() -> None:
    """Collective, just after DeepSpeed's init_distributed. On CPUs under DeepSpeed's launcher (which
    sets LOCAL_SIZE), DeepSpeed's all-reduce maps a buffer of 66 MiB per rank from /dev/shm and never
    removes it: every run would leave one per rank there. Once every rank has mapped every other's
    (init returns only then; the barrier waits for all), each removes its own name; the mappings stay."""
    if "LOCAL_SIZE" not in os.environ or dist.get_backend() != "gloo":
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(name)


def barrier(group: Optional[dist.ProcessGroup] = None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def vote(values: list[int], group: dist.ProcessGroup) -> list[int]:
    """Collective: the element-wise minimum of every rank's integers, in one small all-reduce (a flag
    that any rank may raise goes in negated: -1 if raised, else 0)."""
    ballot = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(ballot, op=dist.ReduceOp.MIN, group=group)
    return ballot.tolist()


def gather_objects(value, group: dist.ProcessGroup) -> list:
    """Every rank's `value`, in rank order, on every rank (a small CPU-side exchange)."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def host_memory() -> int:
    """This node's memory: physical, or the container's cgroup limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):  # no such cgroup, or "max"
            pass
    return total


def node_figures(par: Parallel) -> tuple[Optional[int], int]:
    """Collective: (the smallest GPU's memory, None without GPUs; the smallest node's host memory),
    in bytes, as each node's first rank reads them."""
    mine = None
    if par.is_node_first:
        gpu = torch.cuda.get_device_properties(par.device).total_memory if par.device.type == "cuda" else None
        mine = (gpu, host_memory())
    seen = [m for m in gather_objects(mine, par.ctrl_group) if m is not None]
    return min((g for g, _ in seen if g is not None), default=None), min(h for _, h in seen)


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
