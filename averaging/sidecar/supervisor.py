"""The trainers' side of the sidecar: each training rank starts one sidecar rank beside itself,
and the trainers vote on liveness at log steps (one tiny gloo all-reduce) so that all restart the
whole sidecar group together. Training never waits for the sidecar, except for its last
evaluation at the end (bounded by `sidecar.exit_timeout_s`)."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from core.config import need
from core.log import logger
from core.run_dir import RunDir

PR_SET_PDEATHSIG = 1


@dataclass
class SidecarArgs:
    enabled: bool = False  # start the sidecar beside the trainers (needs snapshot.every > 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where it averages and evaluates (auto: training's device)
    poll_seconds: float = 0.5  # how often it looks for newly committed slots
    restarts: int = 2  # how many times the trainers restart a crashed sidecar
    port_offset: int = 1  # its rendezvous port: training's MASTER_PORT + this (+ restart count)
    exit_timeout_s: float = 900.0  # at the end of training, how long to wait for its last evaluation
    export_hf: bool = False  # at the end of training, export the best LAWA average to <run_dir>/lawa_best_hf

    def validate(self) -> None:
        need(self.restarts >= 0, f"sidecar.restarts: must be >= 0, got {self.restarts}")
        need(self.poll_seconds > 0, f"sidecar.poll_seconds: must be positive, got {self.poll_seconds}")
        need(self.exit_timeout_s >= 0, f"sidecar.exit_timeout_s: must be >= 0, got {self.exit_timeout_s}")


def die_with_parent() -> None:
    """In the sidecar's process, before it runs: the kernel kills it when its trainer dies, however
    the trainer dies (a sidecar blocked in a collective would otherwise outlive it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the sidecar still leaves once it sees its parent gone
        pass


class SidecarSupervisor:
    def __init__(self, args: SidecarArgs, run_dir: str, rank: int, world_size: int, local_rank: int,
                 master_addr: str, master_port: int, ctrl_group: dist.ProcessGroup):
        self.args, self.run_dir, self.ctrl_group = args, run_dir, ctrl_group
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.master_addr, self.master_port = master_addr, master_port
        self.generation = 0
        self.proc: Optional[subprocess.Popen] = None
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        env.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                   MASTER_ADDR=self.master_addr,
                   MASTER_PORT=str(self.master_port + self.args.port_offset + self.generation),
                   PYTHONUNBUFFERED="1")
        # torchrun's variables would make the sidecar join the trainers' rendezvous store
        # (TORCHELASTIC_USE_AGENT_STORE) instead of hosting its own.
        for var in [v for v in env if v.startswith("TORCHELASTIC_")] + ["GROUP_RANK", "ROLE_RANK", "ROLE_NAME"]:
            env.pop(var, None)
        log_path = RunDir(self.run_dir).sidecar_log(self.rank)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "averaging.sidecar", "--run-dir", self.run_dir, "--parent-pid", str(os.getpid())],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd(), preexec_fn=die_with_parent)
        logger.info(f"sidecar started (generation {self.generation}, pid {self.proc.pid}); log: {log_path}")

    def check(self) -> bool:
        """Collective. Restarts the group if any rank's sidecar died; False once out of restarts."""
        alive = torch.tensor([int(self.proc is not None and self.proc.poll() is None)], dtype=torch.int64)
        dist.all_reduce(alive, op=dist.ReduceOp.MIN, group=self.ctrl_group)
        if alive.item() == 1 or self.proc is None:
            return self.proc is not None
        code = self.proc.poll()
        if self.generation >= self.args.restarts:
            logger.info(f"sidecar stopped (exit code {code} on rank {self.rank} or another rank) and "
                        f"sidecar.restarts={self.args.restarts} is used up; training goes on without it")
            self.stop()
            self.proc = None
            return False
        logger.info(f"sidecar died (see {RunDir(self.run_dir).sidecar}/rank*.log); restarting it, training goes on")
        self.stop()
        self.generation += 1
        self._start()
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def wait(self, timeout_s: float) -> Optional[int]:
        """At the end of training: let the sidecar finish its last evaluation."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.info(f"sidecar still busy after {timeout_s:.0f}s; stopping it")
            self.stop()
            return None
