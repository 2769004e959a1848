"""Learning-rate schedules: pure functions of the step, so a resumed run needs nothing but the step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from core.config import need
from core.decay import DECAYS, DecayShape


@dataclass
class ScheduleArgs:
    name: Literal["cosine", "linear", "constant", "wsd"] = "cosine"  # decay after warmup; wsd: warmup-stable-decay
    warmup_steps: int = 2000  # linear warmup to the peak; in a continual-pretraining run, the re-warmup
    min_lr_ratio: float = 0.1  # min_lr = lr * min_lr_ratio (nanoGPT uses lr/10) ...
    min_lr: Optional[float] = None  # ... or the final LR itself, as the LAWA paper's scripts give it
    decay_steps: Optional[int] = None  # cosine/linear: step at which the decay reaches min_lr; None: train.steps
    cooldown_steps: int = 0  # wsd: length of the cooldown from the peak to min_lr
    cooldown_shape: DecayShape = "linear"  # wsd: linear, cosine or 1-sqrt
    cooldown_start: Optional[int] = None  # wsd: first cooldown step; None: train.steps - cooldown_steps

    def validate(self, total_steps: int) -> None:
        """The schedule section, for a run of `total_steps` steps (train.steps)."""
        need(self.warmup_steps >= 0, f"schedule.warmup_steps: must be >= 0, got {self.warmup_steps}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        need(self.min_lr is None or self.min_lr >= 0, f"schedule.min_lr: must be >= 0, got {self.min_lr}")
        if self.name in ("cosine", "linear"):
            decay_steps = self.decay_steps if self.decay_steps is not None else total_steps
            need(self.warmup_steps <= decay_steps,
                 f"schedule.warmup_steps={self.warmup_steps} exceeds the decay length "
                 f"({'schedule.decay_steps' if self.decay_steps is not None else 'train.steps'}={decay_steps})")
        if self.name == "wsd":
            need(self.cooldown_steps > 0, f"schedule.cooldown_steps: schedule.name=wsd needs a cooldown length > 0, "
                                          f"got {self.cooldown_steps}")
            begin = cooldown_start(self, total_steps)
            need(begin >= self.warmup_steps,
                 f"schedule: the cooldown would start at step {begin}, inside the {self.warmup_steps}-step warmup "
                 f"(schedule.cooldown_start, or train.steps - schedule.cooldown_steps)")


def cooldown_start(args: ScheduleArgs, total_steps: int) -> int:
    return args.cooldown_start if args.cooldown_start is not None else total_steps - args.cooldown_steps


def final_lr(peak_lr: float, args: ScheduleArgs) -> float:
    """The LR a decay ends at: schedule.min_lr, else the peak × schedule.min_lr_ratio."""
    return args.min_lr if args.min_lr is not None else peak_lr * args.min_lr_ratio


def lr_at(step: int, peak_lr: float, args: ScheduleArgs, total_steps: int) -> float:
    """Learning rate for the optimizer update with 0-based index `step`.

    Linear warmup from peak/warmup to the peak over `warmup_steps` updates. Then:
    cosine/linear: the shape from the peak down to `peak * min_lr_ratio` at `decay_steps`, min_lr after;
    constant: the peak;
    wsd: the peak until `cooldown_start`, then `cooldown_shape` down to min_lr over `cooldown_steps`,
    min_lr after. Because the cooldown's start is a setting, an "infinite" run can be resumed from
    any checkpoint of its stable phase with a cooldown that starts there.
    """
    if step < args.warmup_steps:
        return peak_lr * (step + 1) / args.warmup_steps
    min_lr = final_lr(peak_lr, args)
    if args.name == "constant":
        return peak_lr
    if args.name == "wsd":
        begin = cooldown_start(args, total_steps)
        if step < begin:
            return peak_lr
        if step >= begin + args.cooldown_steps:
            return min_lr
        progress = (step - begin) / args.cooldown_steps
        return min_lr + (peak_lr - min_lr) * DECAYS[args.cooldown_shape].factor(progress)
    decay_steps = args.decay_steps if args.decay_steps is not None else total_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - args.warmup_steps) / max(1, decay_steps - args.warmup_steps)
    return min_lr + (peak_lr - min_lr) * DECAYS[args.name].factor(progress)
