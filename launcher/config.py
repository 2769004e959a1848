"""The job config: one YAML file (plus `section.key=value` overrides) -> typed dataclasses.

Each component declares its own `*Args` dataclass next to its code and validates its own section;
`JobConfig` composes them and checks only the rules that span sections. Every mistake is a
`ConfigError` whose message is one line naming the key.

    python -m launcher.config --job JOB [overrides]     # print the resolved config
    python -m launcher.config --job JOB --get run_dir   # one resolved value
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from averaging.ema_swa import EmaArgs, SwaArgs, scheduled_lr
from averaging.evaluate import EvalArgs
from averaging.lawa import LawaArgs, Merge, slots_needed
from averaging.sidecar.supervisor import SidecarArgs
from core.config import ConfigError, FilePath, dump_yaml, get_value, load_config, need
from core.distributed import ParallelArgs
from launcher.branch import CooldownsArgs
from launcher.checkpoint import CheckpointArgs
from launcher.data import DataArgs
from launcher.metrics import LoggingArgs
from launcher.optim import OptimizerArgs
from launcher.schedule import ScheduleArgs, cooldown_start, final_lr, lr_at
from launcher.snapshot import SnapshotArgs
from launcher.start import GrowthArgs
from launcher.train_args import TrainArgs
from models.registry import ModelArgs

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB = REPO_ROOT / "jobs" / "tiny_cpu.yaml"


@dataclass
class JobConfig:
    name: str = "tiny_cpu"
    run_dir: Optional[FilePath] = None  # None: runs/<name>
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    snapshot: SnapshotArgs = field(default_factory=SnapshotArgs)
    lawa: LawaArgs = field(default_factory=LawaArgs)
    ema: EmaArgs = field(default_factory=EmaArgs)
    swa: SwaArgs = field(default_factory=SwaArgs)
    growth: GrowthArgs = field(default_factory=GrowthArgs)
    sidecar: SidecarArgs = field(default_factory=SidecarArgs)
    cooldowns: CooldownsArgs = field(default_factory=CooldownsArgs)

    def validate(self) -> None:
        """Every section by its owner, then the combinations that cannot work."""
        self.model.validate(tp=self.parallel.tensor)
        self.schedule.validate(total_steps=self.train.steps)
        for section in (self.data, self.optimizer, self.train, self.parallel, self.checkpoint, self.eval,
                        self.logging, self.snapshot, self.lawa, self.ema, self.swa, self.growth, self.sidecar,
                        self.cooldowns):
            section.validate()

        m, d, p, snap = self.model, self.data, self.parallel, self.snapshot
        need(self.schedule.min_lr is None or self.schedule.min_lr <= self.optimizer.lr,
             f"schedule.min_lr={self.schedule.min_lr} exceeds the peak optimizer.lr={self.optimizer.lr}")
        if m.block_size is not None:
            need(d.seq_len <= m.block_size, f"data.seq_len={d.seq_len} exceeds model.block_size={m.block_size}")
        need(p.tensor == 1 or m.dropout == 0.0,
             "model.dropout must be 0 with parallel.tensor > 1 (dropout masks would differ across tensor-parallel ranks)")
        sources = [key for key, value in (("checkpoint.init_from", self.checkpoint.init_from),
                                          ("checkpoint.branch_from", self.checkpoint.branch_from),
                                          ("growth.from_run", self.growth.from_run)) if value is not None]
        need(len(sources) <= 1, f"{' and '.join(sources)} each say where the weights come from: set one")
        need(not (self.ema.enabled or self.swa.enabled) or snap.every > 0,
             "ema.enabled/swa.enabled need snapshot.every > 0 (the averages are snapshotted beside the weights "
             "and scored by the sidecar)")
        need(not self.eval.all_tasks or snap.every > 0,
             "eval.tasks and eval.harness_tasks are scored by the sidecar: they need snapshot.every > 0")
        need(not self.eval.task_every or snap.every == 0 or self.eval.task_every % snap.every == 0,
             f"eval.task_every={self.eval.task_every} must be a multiple of snapshot.every={snap.every} "
             "(the tasks are scored at snapshot steps)")
        need(not self.sidecar.enabled or snap.every > 0,
             "sidecar.enabled needs snapshot.every > 0 (the sidecar averages snapshots)")
        if snap.every > 0:
            for merge in self.merges():
                need(merge.window_steps is None or merge.window_steps >= merge.spacing,
                     f"lawa.merges: {merge.name}'s window_tokens spans {merge.window_steps} steps, less than its "
                     f"spacing of {merge.spacing}: it would merge one snapshot")
                needed = slots_needed(merge, snap.every)
                need(snap.slots >= needed,
                     f"snapshot.slots={snap.slots} cannot hold merge {merge.describe()} at snapshot.every={snap.every} "
                     f"plus one being written: needs at least {needed}")

        self._validate_cooldowns()
        self._validate_reach()

    def _validate_reach(self) -> None:
        """Settings that could never take effect in a run of train.steps steps: each is an error naming
        its keys, rather than a run that silently trains without it."""
        steps, snap = self.train.steps, self.snapshot
        if self.swa.enabled:
            every = self.swa.every or snap.every
            first = -(-max(self.swa.start_step, 1) // every) * every
            need(first <= steps, f"swa.start_step={self.swa.start_step}: SWA's first weights (step {first}, every "
                                 f"{every} steps) come after the run's last step, train.steps={steps}")
        need(not self.ema.enabled or self.ema.start_step < steps,
             f"ema.start_step={self.ema.start_step}: the EMA would start after the run's last step, train.steps={steps}")
        need(self.swa.lr is None or self.swa.start_step < steps,
             f"swa.lr: its phase starts at swa.start_step={self.swa.start_step}, after train.steps={steps}")
        if snap.every > 0 and self.sidecar.enabled:
            for i, merge in enumerate(self.merges()):
                stride = -(-merge.spacing // snap.every) * snap.every  # steps between the snapshots it takes
                span = (merge.k - 1) * stride if merge.k is not None else merge.window_steps
                key = f"lawa.merges[{i}]" if self.lawa.merges else "lawa.k and lawa.spacing"
                need(snap.every + span <= steps,
                     f"{key}: {merge.describe()} spans {span} steps, longer than a run of train.steps={steps} "
                     f"with snapshot.every={snap.every} can fill")

    def _validate_cooldowns(self) -> None:
        """Each scheduled cooldown branches from the stable phase and ends inside it, at a scored
        snapshot: the merge the sidecar scored there is its forecast at equal compute."""
        if not self.cooldowns.at:
            return
        sched, stable = self.schedule, self.stable_phase
        need(stable is not None, f"cooldowns.at needs a stable phase to branch from: schedule.name=wsd or "
                                 f"constant, not {sched.name}")
        stable_end = stable[1]
        for at, steps, _, _ in self.cooldown_branches():
            need(steps > 0, "cooldowns.steps: give the cooldowns' length (schedule.cooldown_steps is 0)")
            need(sched.warmup_steps <= at and at + steps <= stable_end,
                 f"cooldowns.at: a {steps}-step cooldown from step {at} must start after the {sched.warmup_steps}-step "
                 f"warmup and end by step {stable_end}, where the stable phase ends")
            need(self.snapshot.every > 0 and self.sidecar.enabled and (at + steps) % self.snapshot.every == 0,
                 f"cooldowns.at: the cooldown from step {at} ends at step {at + steps}, which must be a step the "
                 f"sidecar scores (sidecar.enabled, a multiple of snapshot.every={self.snapshot.every}): the merges "
                 f"there are its forecast")

    @property
    def stable_phase(self) -> Optional[tuple[int, int]]:
        """(warmup's last step, stable phase's last step): the steps after the first, up to the
        second, train at the peak learning rate; None for a schedule that decays all along."""
        if self.schedule.name == "wsd":
            return self.schedule.warmup_steps, cooldown_start(self.schedule, self.train.steps)
        return (self.schedule.warmup_steps, self.train.steps) if self.schedule.name == "constant" else None

    def cooldown_branches(self) -> list[tuple[int, int, str, float]]:
        """(step, length, shape, min_lr_ratio) of each scheduled cooldown, defaults from the schedule's."""
        c, s = self.cooldowns, self.schedule
        ratio = final_lr(self.optimizer.lr, s) / self.optimizer.lr
        return [(at, c.steps if c.steps is not None else s.cooldown_steps, c.shape or s.cooldown_shape,
                 c.min_lr_ratio if c.min_lr_ratio is not None else ratio) for at in c.at]

    def forecast_merge(self) -> Optional[str]:
        """The merge whose score is the run's forecast of a cooldown (lawa.forecast)."""
        choice, merges = self.lawa.forecast, self.merges()
        if choice != "auto":
            return None if choice == "none" else choice
        # A schedule that anneals the raw weights itself has nothing to forecast. Otherwise the
        # headline merge: at CPU scale a uniform window forecasts real cooldowns better than one
        # weighted like the decay (docs/results/wsd_default_cpu, docs/results/merges_cpu).
        return None if self.stable_phase is None else merges[0].name

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def merges(self) -> list[Merge]:
        return self.lawa.resolve(self.snapshot.every, self.tokens_per_step)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir if self.run_dir is not None else str(Path("runs") / self.name)

    def learning_rate(self, step: int) -> float:
        """The learning rate of the update with 0-based index `step`: the schedule, with SWA's
        constant phase on top."""
        return scheduled_lr(step, lr_at(step, self.optimizer.lr, self.schedule, self.train.steps), self.swa)


def load_job(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a job file (default: the tiny CPU job), apply overrides, check types and combinations."""
    return load_config(JobConfig, Path(path) if path is not None else DEFAULT_JOB, overrides)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.config",
                                     description="Print a job's resolved config (every key, defaults filled in).")
    parser.add_argument("--job", default=None)
    parser.add_argument("--get", default=None, help="print one resolved value, e.g. run_dir or train.steps")
    parser.add_argument("overrides", nargs="*")
    cli = parser.parse_args(argv)
    try:
        job = load_job(cli.job, cli.overrides)
        if cli.get == "run_dir":
            print(job.resolved_run_dir)
        elif cli.get:
            print(get_value(job, cli.get))
        else:
            print(dump_yaml(job), end="")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
