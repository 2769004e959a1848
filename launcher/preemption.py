"""Preemption: a warning signal (SIGUSR1 from Slurm's --signal, or SIGTERM) ends the run cleanly.

The handler only records the signal. At the end of every step the ranks vote (one tiny gloo
all-reduce), so all of them stop after the same step even when the signal reaches them at
different moments; the trainer then writes a checkpoint and a snapshot, lets the sidecar finish
its last evaluation for a bounded time, and under Slurm requeues the job, which resumes from the
run directory. Signals arriving during the save only repeat the request: nothing is interrupted.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional

import torch
import torch.distributed as dist

from core.log import logger

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self, enabled: bool, ctrl_group: dist.ProcessGroup):
        self.enabled = enabled
        self.ctrl_group = ctrl_group
        self.received: Optional[str] = None
        if enabled:
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has received a warning signal."""
        if not self.enabled:
            return False
        flag = torch.tensor([int(self.received is not None)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.ctrl_group)
        return bool(flag.item())


def requeue_slurm_job() -> bool:
    """Put this Slurm job back in the queue (it then resumes from its run directory)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        logger.info(f"scontrol requeue {job_id} failed: {result.stderr.strip()}; resubmit the same job to resume")
        return False
    logger.info(f"requeued Slurm job {job_id}; it resumes from the last checkpoint")
    return True
