"""The trainers' side of the sidecar: each training rank starts one sidecar rank beside itself,
and the trainers' vote (launcher/trainer.py: every train.vote_every steps, one tiny gloo all-reduce
of all their flags) carries its liveness, so that all restart the whole sidecar group together. Training never waits for the sidecar, except for its last
evaluation at the end (bounded by `sidecar.exit_timeout_s`).

The sidecar group meets at a rendezvous store that the trainers' rank 0 hosts on a port the OS
picks (a fresh one for each generation), published to the other trainers over their control group;
the sidecar ranks join it as torchrun's workers join their agent's store. No port is derived from
another (a Slurm job's master port comes from its job id, and the next job ids' would collide on a
shared node), and no window opens between choosing a port and binding it."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch.distributed as dist

from core.config import need
from core.distributed import Parallel, gather_objects
from core.log import logger
from core.run_dir import RunDir


@dataclass
class SidecarArgs:
    enabled: bool = False  # start the sidecar beside the trainers (needs snapshot.every > 0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # where it averages and evaluates (auto: training's device)
    poll_seconds: float = 0.5  # how often it looks for newly committed slots
    restarts: int = 2  # how many times the trainers restart a crashed sidecar
    exit_timeout_s: float = 900.0  # at the end of training, how long to wait for its last evaluation
    export_hf: bool = False  # at the end of training, export the best LAWA average to <run_dir>/lawa_best_hf

    def validate(self) -> None:
        need(self.restarts >= 0, f"sidecar.restarts: must be >= 0, got {self.restarts}")
        need(self.poll_seconds > 0, f"sidecar.poll_seconds: must be positive, got {self.poll_seconds}")
        need(self.exit_timeout_s >= 0, f"sidecar.exit_timeout_s: must be >= 0, got {self.exit_timeout_s}")


class SidecarSupervisor:
    def __init__(self, args: SidecarArgs, run_dir: str, par: Parallel, master_addr: str):
        self.args, self.run_dir, self.par, self.master_addr = args, run_dir, par, master_addr
        self.generation = 0
        self.proc: Optional[subprocess.Popen] = None
        self.store: Optional[dist.TCPStore] = None
        self._start()

    def _start(self) -> None:
        """Collective: a fresh rendezvous store (rank 0's, on a port the OS picks), then this rank's sidecar."""
        self.store = dist.TCPStore(self.master_addr, 0, None, True, wait_for_workers=False) if self.par.is_main else None
        port = gather_objects(self.store.port if self.store is not None else None, self.par.ctrl_group)[0]
        env = dict(os.environ)
        for var in [v for v in env if v.startswith("TORCHELASTIC_")] + ["GROUP_RANK", "ROLE_RANK", "ROLE_NAME"]:
            env.pop(var, None)
        # Every sidecar rank a client of that store, as torchrun's workers are of their agent's.
        env.update(RANK=str(self.par.rank), WORLD_SIZE=str(self.par.world_size), LOCAL_RANK=str(self.par.local_rank),
                   MASTER_ADDR=self.master_addr, MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True",
                   PYTHONUNBUFFERED="1")
        log_path = RunDir(self.run_dir).sidecar_log(self.par.rank)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "averaging.sidecar", "--run-dir", self.run_dir, "--parent-pid", str(os.getpid())],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd())
        logger.info(f"sidecar started (generation {self.generation}, pid {self.proc.pid}, rendezvous "
                    f"{self.master_addr}:{port}); log: {log_path}")

    def ballot(self) -> list[int]:
        """This rank's part of the trainers' vote: 1 while its sidecar runs, else 0."""
        return [int(self.proc is not None and self.proc.poll() is None)]

    def after_vote(self, result: list[int]) -> bool:
        """Restarts the group (collective) when the vote says some rank's sidecar died; False once
        out of restarts."""
        if result[0] == 1 or self.proc is None:
            return self.proc is not None
        code = self.proc.poll()
        if self.generation >= self.args.restarts:
            logger.info(f"sidecar stopped (exit code {code} on rank {self.par.rank} or another rank) and "
                        f"sidecar.restarts={self.args.restarts} is used up; training goes on without it")
            self.stop()
            self.proc = self.store = None
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
