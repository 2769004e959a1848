"""Pretraining entry point.

    torchrun --nproc_per_node 2 launcher/train.py --job jobs/smoke.yaml [section.key=value ...]
    deepspeed launcher/train.py --job jobs/gpt2_125m.yaml
    python launcher/train.py            # one process, the embedded tiny CPU job

Reads the job, watches its launcher (a rank whose launcher is gone stops: core/orphans.py), holds the
run directory (one run in it at a time: core/run_lock.py), joins the process group, prepares the data if its shards are missing, builds the
model under `deepspeed.zero.Init`, and trains with periodic validation and checkpoints
(launcher/trainer.py). A run directory that already holds a complete checkpoint is resumed from it.
Once the run has reached train.steps, the real cooldowns its job schedules (`cooldowns.at`) branch
from their checkpoints in turn, in the same processes (launcher/cooldown.py).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    # Run as a script (the deepspeed launcher and torchrun do this): make the repo importable
    # even when the project is not pip-installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.distributed import exit_process  # noqa: E402
from core.orphans import exit_with_launcher  # noqa: E402
from launcher.config import JobConfig, load_job  # noqa: E402
from launcher.cooldown import run_scheduled_cooldowns  # noqa: E402
from launcher.trainer import run_job  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_with_launcher(what="this trainer")  # no orphans training on when torchrun's agent is killed
    loaded: list[JobConfig] = []

    def make_job() -> JobConfig:
        loaded.append(load_job(args.job, args.overrides))
        return loaded[-1]

    code = run_job(make_job)
    if code != 0 or not loaded[0].cooldowns.at:
        return code
    return run_scheduled_cooldowns(loaded[0])


if __name__ == "__main__":
    exit_process(main())
