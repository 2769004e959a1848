"""The files the trainers and the sidecar share, each written and read here and nowhere else.

  sidecar/spec.json            SidecarSpec: what the sidecar needs to know of the run (trainer writes)
  sidecar/val_dp{d}.pt         HeldOut: data-parallel rank d's held-out batches per source (trainer writes)
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
from averaging.evaluate import HeldOut
from averaging.lawa import Merge
from core.files import JsonlTail, append_jsonl, read_jsonl, serialize, write_file_atomic, write_json_atomic
from core.run_dir import RunDir


@dataclass
class SidecarSpec:
    deepspeed: dict[str, Any]  # the trainers' DeepSpeed config (the sidecar derives its inference config)
    dp: int
    tp: int
    snapshot_dir: str
    snapshot_every: int
    merges: list[Merge]  # resolved to steps; the first is the headline (its best in lawa_best/)
    device: str  # cpu, cuda, or auto (the trainers')
    training_device: str
    precision: str
    poll_seconds: float
    tensorboard: bool
    export_hf: bool
    tasks: list[str] = field(default_factory=list)  # .jsonl task files, absolute paths
    harness_tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names
    harness_include: Optional[str] = None  # absolute
    task_limit: int = 0
    task_every: int = 0  # tasks scored at slots whose step is a multiple of this; 0: every one
    forecast: Optional[str] = None  # the merge whose score forecasts a cooldown (eval.jsonl's forecast_val_loss)
    # Where the job's scheduled cooldowns end: scored with every merge, before newer slots, even when
    # behind (the end-of-run forecast table compares the merges there).
    forecast_steps: list[int] = field(default_factory=list)

    def write(self, run_dir: str) -> None:
        run = RunDir(run_dir)
        os.makedirs(run.sidecar, exist_ok=True)
        write_json_atomic(run.sidecar_spec, dataclasses.asdict(self))

    @classmethod
    def read(cls, run_dir: str) -> SidecarSpec:
        with open(RunDir(run_dir).sidecar_spec) as f:
            fields = json.load(f)
        return cls(**{**fields, "merges": [Merge(**m) for m in fields["merges"]]})

    @staticmethod
    def exists(run_dir: str) -> bool:
        return os.path.isfile(RunDir(run_dir).sidecar_spec)

    @property
    def sidecar_device(self) -> str:
        return self.training_device if self.device == "auto" else self.device


def write_val_batches(run_dir: str, dp_rank: int, held_out: HeldOut) -> None:
    run = RunDir(run_dir)
    os.makedirs(run.sidecar, exist_ok=True)
    batches = [[(x.to(torch.int32), y.to(torch.int32)) for x, y in source] for source in held_out.batches]
    write_file_atomic(run.val_batches(dp_rank), serialize(
        {"names": held_out.names, "weights": held_out.weights, "batches": batches}))


def read_val_batches(run_dir: str, dp_rank: int) -> HeldOut:
    saved = torch.load(RunDir(run_dir).val_batches(dp_rank), weights_only=True)
    if isinstance(saved, list):  # a run directory from before per-source scoring: one unnamed set
        return HeldOut(["all"], [1.0], [saved])
    return HeldOut(saved["names"], saved["weights"], saved["batches"])


def read_every_val_batches(run_dir: str) -> list[HeldOut]:
    """Every data-parallel rank's held-out batches, in rank order."""
    found, dp_rank = [], 0
    while os.path.isfile(RunDir(run_dir).val_batches(dp_rank)):
        found.append(read_val_batches(run_dir, dp_rank))
        dp_rank += 1
    return found


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


def merge_names(record: dict[str, Any]) -> list[str]:
    """The merges a record scored, headline first (a record from before lawa.merges: just `lawa`)."""
    return list(record["merges"]) if "merges" in record else ["lawa"]


def scored_methods(records: list[dict[str, Any]]) -> list[str]:
    """raw, then every merge in the order the job lists them, then EMA/SWA: those any record scored."""
    names: list[str] = ["raw"]
    for r in records:
        names += [n for n in merge_names(r) if n not in names]
    return [n for n in names + list(KINDS) if any(f"{n}_val_loss" in r for r in records)]


def eval_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An eval.jsonl record's figures under the names every logger charts them by (TensorBoard as
    they are, W&B under `sidecar/`): one chart per figure with every method in it, `val_loss/<method>`
    (and `val_loss/forecast`), `val_loss_minus_raw/<method>`, `val_loss_by_source/<source>/<method>`,
    `tasks/<task>/<metric>/<method>`."""
    losses = {key[:-len("_val_loss")]: value for key, value in record.items()
              if key.endswith("_val_loss") and isinstance(value, (int, float))}
    out = {f"val_loss/{name}": loss for name, loss in losses.items()}
    out.update({f"val_loss_minus_raw/{name}": loss - losses["raw"] for name, loss in losses.items()
                if name not in ("raw", "forecast") and "raw" in losses})
    for name, by_source in record.get("val_loss_by_source", {}).items():
        out.update({f"val_loss_by_source/{source}/{name}": loss for source, loss in by_source.items()})
    for name, by_task in record.get("tasks", {}).items():
        out.update({f"tasks/{task}/{metric}/{name}": value for task, metrics in by_task.items()
                    for metric, value in metrics.items() if metric != "n"})
    return out


def format_eval_line(r: dict[str, Any]) -> str:
    raw = r["raw_val_loss"]
    scores = ", ".join(f"{name} {r[f'{name}_val_loss']:.4f} ({r[f'{name}_val_loss'] - raw:+.4f})"
                       for name in scored_methods([r])[1:])
    steps = ",".join(str(s) for s in r["steps_averaged"])
    tasks = r.get("tasks", {})
    head = merge_names(r)[0]
    task_text = ""
    for name, metrics in tasks.get(head, {}).items():
        metric = next((m for m in ("acc", *metrics) if m in metrics and m != "n"), None)
        if metric is not None:
            task_text += f"; {name} {metric} raw {tasks['raw'][name][metric]:.3f} {head} {metrics[metric]:.3f}"
    skipped = f"; skipped {', '.join(r['skipped'])} (behind)" if r.get("skipped") else ""
    return f"lawa | step {r['step']}: raw val {raw:.4f}, {scores} [{head}: {steps}]{task_text}{skipped}"
