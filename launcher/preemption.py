"""Preemption: a warning signal (SIGUSR1 from Slurm's --signal, or SIGTERM) ends the run cleanly.

The handler only records the signal. The flag rides on the training loop's vote (one tiny gloo
all-reduce every `train.vote_every` steps, at snapshot steps and at the last step: never a
collective of its own), so all ranks stop after the same step even when the signal reaches them at
different moments, at most `vote_every - 1` steps after it arrives (Slurm's `--signal=USR1@180`
gives 180 s); the trainer then writes a checkpoint and a snapshot, lets the sidecar finish its last
evaluation for a bounded time, and under Slurm requeues the job, which resumes from the run
directory. Signals arriving during the save only repeat the request: nothing is interrupted.
"""
from __future__ import annotations

import os
import signal
import subprocess
from typing import Optional

from core.log import logger

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.received: Optional[str] = None
        if enabled:
            for sig in SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def ballot(self) -> list[int]:
        """This rank's part of the loop's vote: -1 once it has received a warning signal."""
        return [-int(self.received is not None)]

    @staticmethod
    def stop(result: list[int]) -> bool:
        """From the vote's result: whether any rank received one."""
        return result[0] < 0


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
