"""Metrics: JSON lines in the run directory (the record of truth), console lines, TensorBoard if
present, and Weights & Biases when `logging.wandb.mode` is online or offline.

W&B: one run per run directory (its id kept in `<run_dir>/wandb_id`, so a resumed or requeued job
continues it), every chart on our own step axis (`define_metric("*", step_metric="step")`, with
`tokens` beside it): the sidecar's evaluations, which the trainer reads from eval.jsonl after it has
logged later steps, land at their training step. The trainer's keys are metrics.jsonl's (`loss`,
`lr`, `val_loss`, `val_loss_by_source/<source>`, ...); the sidecar's are its TensorBoard names under
`sidecar/` (averaging.sidecar.protocol.eval_scalars): `sidecar/val_loss/<method>`, ...
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from averaging.sidecar.protocol import eval_scalars
from core.config import need
from core.files import write_file_atomic
from core.log import logger
from core.run_dir import RunDir

WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbArgs:
    mode: str = "disabled"  # online | offline (local files, `wandb sync` later) | disabled
    project: str = "lawa"
    entity: Optional[str] = None  # your W&B user or team; None: the account's default
    name: Optional[str] = None  # the run's display name; None: the job's name

    def validate(self) -> None:
        need(self.mode in WANDB_MODES, f"logging.wandb.mode: must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")
        need(bool(self.project), "logging.wandb.project: must not be empty")


@dataclass
class LoggingArgs:
    every: int = 10  # log training metrics every this many steps
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed
    wandb: WandbArgs = field(default_factory=WandbArgs)

    def validate(self) -> None:
        need(self.every > 0, f"logging.every: must be positive, got {self.every}")
        self.wandb.validate()


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) record under slash-joined keys: {"a": {"b": 1}} -> {"a/b": 1}."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def sidecar_row(record: dict[str, Any]) -> dict[str, float]:
    """An eval.jsonl record as a W&B row: the sidecar's charts (protocol.eval_scalars) under sidecar/."""
    return {"step": record["step"], "tokens": record["tokens"],
            **{f"sidecar/{name}": value for name, value in eval_scalars(record).items()}}


class WandbRun:
    """The job's W&B run, on the main rank only; created or resumed from the id in the run dir."""

    def __init__(self, args: WandbArgs, run_dir: str, job_name: str, config: dict[str, Any]):
        import wandb

        run = RunDir(run_dir)
        if os.path.isfile(run.wandb_id):
            with open(run.wandb_id) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B's id form: 8 lowercase letters and digits
            write_file_atomic(run.wandb_id, run_id + "\n")
        os.makedirs(run.wandb, exist_ok=True)
        self.run = wandb.init(project=args.project, entity=args.entity, name=args.name or job_name, id=run_id,
                              resume="allow", mode=args.mode, dir=run.path, config=config,
                              settings=wandb.Settings(silent=True, console="off"))
        self.run.define_metric("step")
        self.run.define_metric("tokens")
        self.run.define_metric("*", step_metric="step")
        logger.info(f"wandb: run {run_id} ({args.mode}) in {run.wandb}")

    def log(self, row: dict[str, float]) -> None:
        self.run.log(row)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Writes one JSON object per line to metrics.jsonl; only the main rank writes anything."""

    def __init__(self, run_dir: str, is_main: bool, args: LoggingArgs, job_name: str = "run",
                 config: Optional[dict[str, Any]] = None):
        self.is_main = is_main
        self._file = None
        self._tb = None
        self._wandb: Optional[WandbRun] = None
        if not is_main:
            return
        run = RunDir(run_dir)
        self._file = open(run.metrics, "a", buffering=1)
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(run.tensorboard)
        if args.wandb.mode != "disabled":
            self._wandb = WandbRun(args.wandb, run_dir, job_name, config or {})

    def log(self, record: dict[str, Any], console: Optional[str] = None) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if console:
            logger.info(console)
        if "step" not in record or "event" in record:
            return
        numbers = {k: v for k, v in flatten(record).items() if k not in ("step", "time")}
        if self._tb is not None:
            for key, value in numbers.items():
                # per-source losses: one chart per source, the sidecar's methods beside the trainer's
                self._tb.add_scalar(f"{key}/trainer" if key.startswith("val_loss_by_source/") else key, value,
                                    record["step"])
        if self._wandb is not None:
            self._wandb.log({"step": record["step"], **numbers})

    def log_sidecar(self, record: dict[str, Any]) -> None:
        """A sidecar evaluation (already in eval.jsonl and the sidecar's TensorBoard) into W&B."""
        if self._wandb is not None:
            self._wandb.log(sidecar_row(record))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
