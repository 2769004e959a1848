"""The training loop's own settings (`train.*`): its length, batch sizes, seed, precision and speed-ups."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from core.config import ConfigError, need


@dataclass
class TrainArgs:
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per rank per forward/backward; accumulation fills the rest
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1337
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    stop_at: Optional[int] = None  # checkpoint and stop after this step (the schedule still spans `steps`)
    # Speed-ups, off by default and chosen by measurement (bench/gpu_check.py): a torch.compile backend
    # (e.g. inductor; None: eager) for the whole model at ZeRO-1/2, for each transformer block as one
    # graph at ZeRO-3 (core/engine.py); and recomputing activations in backward.
    compile: Optional[str] = None
    activation_checkpointing: bool = False
    # torch's deterministic algorithms (strict: an op that has none stops the run, naming it) and
    # cuBLAS's fixed workspace: on a GPU a rerun or a resume gives the same losses bit for bit, at a
    # cost in speed. For checks (bench/gpu_check.py) and for chasing a divergence; CPUs are already.
    deterministic: bool = False
    # The ranks' one collective of their own (a warning signal, finished snapshot writes, the sidecar's
    # liveness), every this many steps, and at snapshot and last steps: a signal stops every rank after
    # the same step, at most vote_every - 1 steps after it arrives; other steps run DeepSpeed's only.
    vote_every: int = 10

    def validate(self) -> None:
        need(self.steps > 0, f"train.steps: must be positive, got {self.steps}")
        need(self.micro_batch_size > 0, f"train.micro_batch_size: must be positive, got {self.micro_batch_size}")
        need(self.global_batch_size > 0, f"train.global_batch_size: must be positive, got {self.global_batch_size}")
        need(self.global_batch_size % self.micro_batch_size == 0,
             f"train.global_batch_size={self.global_batch_size} is not divisible by "
             f"train.micro_batch_size={self.micro_batch_size}")
        need(self.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {self.grad_clip}")
        need(self.seed >= 0, f"train.seed: must be >= 0, got {self.seed}")
        need(self.vote_every >= 1, f"train.vote_every: must be >= 1, got {self.vote_every}")
        if self.stop_at is not None:
            need(0 < self.stop_at <= self.steps, f"train.stop_at={self.stop_at} must be in [1, train.steps={self.steps}]")

    def accumulation_steps(self, dp: int) -> int:
        """Gradient-accumulation steps that fill the global batch at data-parallel size `dp`."""
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step != 0:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not divisible by "
                              f"train.micro_batch_size × data-parallel size = {self.micro_batch_size} × {dp}")
        return self.global_batch_size // per_step

    def resolved_precision(self, device_type: str) -> str:
        if self.precision == "auto":
            return "bf16" if device_type == "cuda" else "fp32"
        return self.precision
