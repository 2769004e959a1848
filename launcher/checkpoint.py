"""Full, resumable checkpoints through DeepSpeed's `save_checkpoint`, keeping the last n.

A checkpoint counts only once every rank has written it: after DeepSpeed's save and a barrier,
the main rank writes `run_state.json` into the tag folder and then points `latest` at it, each
with an atomic rename. A crash mid-save leaves a folder without `run_state.json`, which resume
ignores, and `latest` still names the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

from averaging.slots import write_file_atomic
from launcher.distributed import barrier

RUN_STATE = "run_state.json"
TAG_PREFIX = "step_"


@dataclass
class CheckpointArgs:
    every: int = 1000  # save a full checkpoint every this many steps, and at the end
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint found in `dir`
    on_signal: bool = True  # SIGUSR1/SIGTERM: finish the step, checkpoint, snapshot and stop
    requeue: bool = True  # after stopping on a signal under Slurm, `scontrol requeue` the job


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        digits = name[len(TAG_PREFIX):]
        if name.startswith(TAG_PREFIX) and digits.isdigit() and os.path.isfile(os.path.join(ckpt_dir, name, RUN_STATE)):
            found.append((int(digits), name))
    return sorted(found)


def read_run_state(ckpt_dir: str, tag: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, RUN_STATE)) as f:
        return json.load(f)


def save(engine, ckpt_dir: str, step: int, run_state: dict[str, Any], keep: int, is_main: bool) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"run_state": run_state}, save_latest=False)
    barrier()
    if is_main:
        write_file_atomic(os.path.join(ckpt_dir, tag, RUN_STATE), json.dumps({"step": step, **run_state}, indent=1).encode())
        write_file_atomic(os.path.join(ckpt_dir, "latest"), tag.encode())  # what zero_to_fp32 reads by default
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> None:
    """Collective. Loads weights, optimizer state and engine counters of a complete checkpoint."""
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
