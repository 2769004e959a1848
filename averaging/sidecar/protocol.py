"""The files the trainers and the sidecar share, each written and read here and nowhere else.

  sidecar/spec.json            SidecarSpec: what the sidecar needs to know of the run (trainer writes)
  sidecar/val_dp{d}.pt         the trainer's held-out batches of data-parallel rank d (trainer writes)
  sidecar/training_done.json   TrainingDone: the last snapshot is committed (trainer writes)
  eval.jsonl                   one record per evaluated snapshot (sidecar writes; trainer, report read)

The sidecar can be started by hand on any run directory holding these files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from averaging.ema_swa import KINDS
from core.files import JsonlTail, append_jsonl, read_jsonl, serialize, write_file_atomic, write_json_atomic
from core.run_dir import RunDir


@dataclass
class SidecarSpec:
    deepspeed: dict[str, Any]  # the trainers' DeepSpeed config (the sidecar derives its inference config)
    dp: int
    tp: int
    snapshot_dir: str
    snapshot_every: int
    lawa_k: int
    lawa_spacing: int  # steps; never 0 here (the trainer resolves 0 to snapshot.every)
    device: str  # cpu, cuda, or auto (the trainers')
    training_device: str
    precision: str
    poll_seconds: float
    tensorboard: bool
    export_hf: bool
    tasks: list[str] = field(default_factory=list)  # absolute paths
    task_limit: int = 0

    def write(self, run_dir: str) -> None:
        run = RunDir(run_dir)
        os.makedirs(run.sidecar, exist_ok=True)
        write_json_atomic(run.sidecar_spec, dataclasses.asdict(self))

    @classmethod
    def read(cls, run_dir: str) -> SidecarSpec:
        with open(RunDir(run_dir).sidecar_spec) as f:
            return cls(**json.load(f))

    @staticmethod
    def exists(run_dir: str) -> bool:
        return os.path.isfile(RunDir(run_dir).sidecar_spec)

    @property
    def sidecar_device(self) -> str:
        return self.training_device if self.device == "auto" else self.device


def write_val_batches(run_dir: str, dp_rank: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    run = RunDir(run_dir)
    os.makedirs(run.sidecar, exist_ok=True)
    tensors = [(x.to(torch.int32), y.to(torch.int32)) for x, y in batches]
    write_file_atomic(run.val_batches(dp_rank), serialize(tensors))


def read_val_batches(run_dir: str, dp_rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return torch.load(RunDir(run_dir).val_batches(dp_rank), weights_only=True)


@dataclass
class TrainingDone:
    last_snapshot_step: Optional[int]
    final_step: int


def mark_training_done(run_dir: str, last_snapshot_step: Optional[int], final_step: int) -> None:
    write_json_atomic(RunDir(run_dir).training_done, dataclasses.asdict(TrainingDone(last_snapshot_step, final_step)))


def clear_training_done(run_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(RunDir(run_dir).training_done)


def read_training_done(run_dir: str) -> Optional[TrainingDone]:
    try:
        with open(RunDir(run_dir).training_done) as f:
            return TrainingDone(**json.load(f))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------------------------
# eval.jsonl


def append_eval_record(run_dir: str, record: dict[str, Any]) -> None:
    append_jsonl(RunDir(run_dir).eval_log, record)


def read_eval_log(run_dir: str) -> list[dict[str, Any]]:
    """Records of eval.jsonl, by step; a step evaluated twice (after a restart) keeps its last record."""
    by_step = {record["step"]: record for record in read_jsonl(RunDir(run_dir).eval_log)}
    return [by_step[s] for s in sorted(by_step)]


def follow_eval_log(run_dir: str) -> JsonlTail:
    """New eval.jsonl records as the sidecar appends them (from the end of what is there now)."""
    return JsonlTail(RunDir(run_dir).eval_log)


def format_eval_line(r: dict[str, Any]) -> str:
    steps = ",".join(str(s) for s in r["steps_averaged"])
    others = "".join(f", {kind.upper()} {r[f'{kind}_val_loss']:.4f}" for kind in KINDS if f"{kind}_val_loss" in r)
    tasks = r.get("tasks", {})
    scores = "".join(f"; {name} acc raw {tasks['raw'][name]['acc']:.3f} LAWA {tasks['lawa'][name]['acc']:.3f}"
                     for name in tasks.get("lawa", {}))
    return (f"lawa | step {r['step']}: raw val {r['raw_val_loss']:.4f}, averaged {r['lawa_val_loss']:.4f} "
            f"(k={r['k']}: {steps}){others}{scores}")


def format_eval_table(records: list[dict[str, Any]]) -> str:
    kinds = [kind for kind in KINDS if any(f"{kind}_val_loss" in r for r in records)]
    lines = ["| step | raw val loss | LAWA val loss | LAWA - raw | k |" + "".join(f" {k.upper()} val loss |" for k in kinds),
             "|---:|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for r in records:
        extra = "".join(f" {r[f'{k}_val_loss']:.4f} |" if f"{k}_val_loss" in r else " |" for k in kinds)
        lines.append(f"| {r['step']} | {r['raw_val_loss']:.4f} | {r['lawa_val_loss']:.4f} | "
                     f"{r['lawa_val_loss'] - r['raw_val_loss']:+.4f} | {r['k']} |" + extra)
    return "\n".join(lines)
