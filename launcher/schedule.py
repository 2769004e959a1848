"""Learning-rate schedules: pure functions of the step, so a resumed run needs nothing but the step."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class ScheduleArgs:
    name: str = "cosine"
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1  # min_lr = lr * min_lr_ratio (the LAWA/nanoGPT recipes use lr/10)
    decay_steps: Optional[int] = None  # step at which the decay reaches min_lr; None: train.steps


def _cosine(progress: float) -> float:
    """Decay factor from 1 to 0 over progress in [0, 1]."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _linear(progress: float) -> float:
    return 1.0 - progress


def _constant(progress: float) -> float:
    return 1.0


# Each decay shape maps progress through the decay phase (0 -> 1) to a factor (1 -> 0) that
# interpolates between the peak and min_lr. A new schedule is one more entry here.
DECAY_SHAPES: dict[str, Callable[[float], float]] = {
    "cosine": _cosine,
    "linear": _linear,
    "constant": _constant,
}


def lr_at(step: int, peak_lr: float, args: ScheduleArgs, total_steps: int) -> float:
    """Learning rate for the optimizer update with 0-based index `step`.

    Linear warmup from peak/warmup to the peak over `warmup_steps` updates, then the decay shape
    from the peak down to `peak * min_lr_ratio` at `decay_steps`, and min_lr after that.
    """
    decay_steps = args.decay_steps if args.decay_steps is not None else total_steps
    min_lr = peak_lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return peak_lr * (step + 1) / args.warmup_steps
    if step >= decay_steps:
        return min_lr if args.name != "constant" else peak_lr
    progress = (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    return min_lr + (peak_lr - min_lr) * DECAY_SHAPES[args.name](progress)
