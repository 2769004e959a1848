"""Branch a real cooldown from a stable-phase checkpoint of a run: the fair baseline for merges.

    torchrun --standalone --nproc_per_node 2 launcher/cooldown.py runs/merges_cpu --at 600 --steps 100
    torchrun ... launcher/cooldown.py runs/merges_cpu --at 600 --steps 100 --shape linear eval.every=25

The branch is a sibling run directory, `<run>_cd<S>_<D>` (`_<shape>` unless 1-sqrt), that continues
the parent's checkpoint of step S (weights, optimizer state, position in the data) for D steps on
the same data, while its learning rate decays from the parent's constant peak to
`peak × --min-lr-ratio` (schedule wsd with cooldown_start S). Its `branch.json` records the parent
and the step; `python -m launcher.report <parent>` puts the cooldown's loss (D steps of extra
compute) beside the parent's merges at S (no extra compute) and at S + D (the same compute).
Snapshots, the sidecar and EMA/SWA are off in the branch; `section.key=value` overrides apply last.
A job can schedule its branches instead (`cooldowns.at`): the same command then runs them after
the run's last step (`run_scheduled_cooldowns`, called by launcher/train.py) and prints each merge's
forecast error against them (launcher/forecast.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Optional

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import ConfigError  # noqa: E402
from core.decay import DECAYS  # noqa: E402
from core.distributed import exit_process, rank_env  # noqa: E402
from core.run_dir import RunDir  # noqa: E402
from core.zero_checkpoint import RunState  # noqa: E402
from launcher.branch import Branch, branch_dir, branch_name  # noqa: E402
from launcher.checkpoint import complete_checkpoints  # noqa: E402
from launcher.config import JobConfig, load_job  # noqa: E402
from launcher.report import end_of_run_report  # noqa: E402
from launcher.trainer import run_job  # noqa: E402


def branch_job(parent_dir: str, at: int, steps: int, shape: str, min_lr_ratio: float,
               overrides: list[str]) -> tuple[JobConfig, Branch]:
    """The branch's job (the parent's resolved config, cooled down from `at`) and its record."""
    config = RunDir(parent_dir).config
    if not os.path.isfile(config):
        raise ConfigError(f"{parent_dir}: no {config}: is it a run directory?")
    parent = load_job(config)
    ckpt_dir = parent.checkpoint.dir or RunDir(parent_dir).checkpoints
    found = dict(complete_checkpoints(ckpt_dir))
    if at not in found:
        raise ConfigError(f"--at {at}: {ckpt_dir} has no complete checkpoint of step {at}; it has "
                          f"{', '.join(map(str, sorted(found))) or 'none'} (checkpoint.every and checkpoint.keep "
                          f"decide which are kept)")
    checkpoint = os.path.abspath(os.path.join(ckpt_dir, found[at]))
    name = branch_name(parent.name, at, steps, shape)
    derived = [f"name={name}", f"run_dir={branch_dir(parent_dir, parent.name, at, steps, shape)}",
               "cooldowns.at=[]", "checkpoint.dir=null", "schedule.name=wsd", f"schedule.cooldown_start={at}", f"schedule.cooldown_steps={steps}",
               f"schedule.cooldown_shape={shape}", f"schedule.min_lr_ratio={min_lr_ratio}", "schedule.min_lr=null",
               f"train.steps={at + steps}", "train.stop_at=null", f"checkpoint.branch_from={checkpoint}",
               "checkpoint.init_from=null", "checkpoint.init_optimizer=false", "growth.from_run=null",
               f"checkpoint.every={steps}", "checkpoint.keep=1", "snapshot.every=0", "sidecar.enabled=false",
               "ema.enabled=false", "swa.enabled=false", "eval.tasks=[]", "eval.harness_tasks=[]", f"eval.every={max(1, steps // 4)}"]
    job = load_job(config, derived + overrides)
    # The branch must be the parent up to `at`: the same learning rate at every step before it.
    for step in range(at):
        mine, theirs = job.learning_rate(step), parent.learning_rate(step)
        if abs(mine - theirs) > 1e-12 * max(abs(theirs), 1e-30):
            raise ConfigError(f"--at {at}: the parent's learning rate at step {step} is {theirs:.3e}, not the "
                              f"{mine:.3e} a cooldown from its peak assumes: branch from the stable phase of a "
                              f"constant or wsd run")
    tokens = RunState.read(checkpoint).tokens
    return job, Branch(parent=os.path.abspath(parent_dir), step=at, tokens=tokens, checkpoint=checkpoint,
                       cooldown_steps=steps, shape=shape, tokens_per_step=job.tokens_per_step)


def finished(run_dir: str, ckpt_dir: Optional[str], steps: int) -> bool:
    """Has the run in `run_dir` a complete checkpoint of its last step?"""
    return steps in dict(complete_checkpoints(ckpt_dir or RunDir(run_dir).checkpoints))


def run_scheduled_cooldowns(parent: JobConfig) -> int:
    """Collective: once the parent has reached train.steps, each cooldown its job schedules
    (`cooldowns.at`), in turn, from its checkpoint (a finished one is skipped, one cut short resumes);
    then the main rank prints the merges beside them and rewrites the run's report."""
    run_dir = parent.resolved_run_dir
    if not finished(run_dir, parent.checkpoint.dir, parent.train.steps):
        return 0  # stopped early (a signal, train.stop_at): the cooldowns run after the run's last step
    branches = parent.cooldown_branches()
    for i, (at, steps, shape, min_lr_ratio) in enumerate(branches):
        where = branch_dir(run_dir, parent.name, at, steps, shape)
        if finished(where, None, at + steps):
            continue
        if rank_env().rank == 0:
            print(f"cooldown {i + 1}/{len(branches)}: {shape} over {steps} steps from step {at} (cooldowns.at) -> "
                  f"{where}", flush=True)

        def make_job(at=at, steps=steps, shape=shape, min_lr_ratio=min_lr_ratio) -> JobConfig:
            job, branch = branch_job(run_dir, at, steps, shape, min_lr_ratio, [])
            if rank_env().rank == 0:
                branch.write(job.resolved_run_dir)
            return job

        gc.collect()  # the last engine's tensors, before the next engine is built in this process
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        code = run_job(make_job)
        if code != 0 or not finished(where, None, at + steps):
            return code  # stopped by a signal: the requeued job (or the same command) goes on from here
    if rank_env().rank == 0:
        print("\n" + end_of_run_report(run_dir), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="the parent run directory")
    parser.add_argument("--at", type=int, required=True, help="the parent's checkpoint step to branch from")
    parser.add_argument("--steps", type=int, required=True, help="cooldown length D in steps")
    parser.add_argument("--shape", default="1-sqrt", choices=sorted(DECAYS), help="decay shape (default 1-sqrt)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.0, help="final LR / peak (default 0)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the branch's job")
    args = parser.parse_intermixed_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be positive")

    def make_job() -> JobConfig:
        job, branch = branch_job(args.run_dir, args.at, args.steps, args.shape, args.min_lr_ratio, args.overrides)
        if rank_env().rank == 0:
            branch.write(job.resolved_run_dir)
        return job

    return run_job(make_job)


if __name__ == "__main__":
    exit_process(main())
