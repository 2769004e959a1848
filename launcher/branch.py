"""Cooldown branches: the ones a job schedules (`cooldowns:`, run after the main phase by the same
command), `branch.json` (what a branch records of where it came from: written by
launcher/cooldown.py, read by the report), and how a report finds a run's branches."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from core.config import need
from core.decay import DecayShape
from core.files import write_json_atomic
from core.run_dir import RunDir


@dataclass
class CooldownsArgs:
    """Real cooldowns branched from stable-phase checkpoints once the run has reached train.steps,
    in the same command: each one's loss at its end calibrates the merges that forecast it."""

    at: list[int] = field(default_factory=list)  # stable-phase steps to branch from (checkpointed, kept)
    steps: Optional[int] = None  # each cooldown's length D; None: schedule.cooldown_steps
    shape: Optional[DecayShape] = None  # None: schedule.cooldown_shape
    min_lr_ratio: Optional[float] = None  # final LR / peak; None: schedule.min_lr_ratio

    def validate(self) -> None:
        need(all(s > 0 for s in self.at), f"cooldowns.at: steps must be positive, got {self.at}")
        need(self.at == sorted(set(self.at)), f"cooldowns.at: list distinct steps in order, got {self.at}")
        need(self.steps is None or self.steps > 0, f"cooldowns.steps: must be positive, got {self.steps}")
        need(self.min_lr_ratio is None or 0.0 <= self.min_lr_ratio <= 1.0,
             f"cooldowns.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


def branch_name(parent: str, at: int, steps: int, shape: str) -> str:
    return f"{parent}_cd{at}_{steps}" + ("" if shape == "1-sqrt" else f"_{shape.replace('-', '')}")


def branch_dir(parent_dir: str, parent_name: str, at: int, steps: int, shape: str) -> str:
    """A branch's run directory: a sibling of its parent's."""
    return os.path.join(os.path.dirname(os.path.abspath(parent_dir)), branch_name(parent_name, at, steps, shape))


@dataclass
class Branch:
    parent: str  # the parent run directory (absolute)
    step: int  # the parent's step the branch continues
    tokens: int  # the parent's tokens at that step
    checkpoint: str  # the parent's checkpoint folder it was loaded from
    cooldown_steps: int  # D: the branch trains steps step+1 .. step+D
    shape: str  # the cooldown's decay shape
    tokens_per_step: int

    @property
    def end_step(self) -> int:
        return self.step + self.cooldown_steps

    @property
    def extra_tokens(self) -> int:
        return self.cooldown_steps * self.tokens_per_step

    def write(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        write_json_atomic(RunDir(run_dir).branch, dataclasses.asdict(self))


def read_branch(run_dir: str) -> Branch | None:
    try:
        with open(RunDir(run_dir).branch) as f:
            return Branch(**json.load(f))
    except FileNotFoundError:
        return None


def branches_of(run_dir: str) -> list[tuple[str, Branch]]:
    """(path, branch) of every branch beside a run (sibling directories naming it as parent), by step."""
    parent = os.path.abspath(run_dir)
    around = os.path.dirname(parent)
    found = []
    for name in sorted(os.listdir(around)):
        path = os.path.join(around, name)
        branch = read_branch(path) if os.path.isdir(path) else None
        if branch is not None and os.path.abspath(branch.parent) == parent:
            found.append((path, branch))
    return sorted(found, key=lambda pb: (pb[1].step, pb[1].cooldown_steps, pb[1].shape))
