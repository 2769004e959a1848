"""Metrics: JSON lines in the run directory (the record of truth), console lines, TensorBoard if present."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from core.config import need
from core.log import logger
from core.run_dir import RunDir


@dataclass
class LoggingArgs:
    every: int = 10  # log training metrics every this many steps
    tensorboard: bool = True  # also write TensorBoard events when tensorboard is installed

    def validate(self) -> None:
        need(self.every > 0, f"logging.every: must be positive, got {self.every}")


class MetricsLogger:
    """Writes one JSON object per line to metrics.jsonl; only the main rank writes anything."""

    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool):
        self.is_main = is_main
        self._file = None
        self._tb = None
        if not is_main:
            return
        run = RunDir(run_dir)
        self._file = open(run.metrics, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(run.tensorboard)

    def log(self, record: dict[str, Any], console: Optional[str] = None) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record) + "\n")
        if console:
            logger.info(console)
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])
                elif key == "val_loss_by_source":  # one chart per source
                    for source, loss in value.items():
                        self._tb.add_scalar(f"{key}/{source}/trainer", loss, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
