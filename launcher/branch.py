"""`branch.json`: what a cooldown branch records of where it came from (written by
launcher/cooldown.py, read by the report), and how a report finds a run's branches."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from core.files import write_json_atomic
from core.run_dir import RunDir


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
