"""Pretraining entry point.

    torchrun --nproc_per_node 2 launcher/train.py --job jobs/smoke.yaml [section.key=value ...]
    deepspeed launcher/train.py --job jobs/gpt2_125m.yaml
    python launcher/train.py            # one process, the embedded tiny CPU job

Reads the job, joins the process group, prepares the data if its shards are missing, builds the
model under `deepspeed.zero.Init`, and trains with periodic validation and checkpoints
(launcher/trainer.py). A run directory that already holds a complete checkpoint is resumed from it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

if __package__ in (None, ""):
    # Run as a script (the deepspeed launcher and torchrun do this): make the repo importable
    # even when the project is not pip-installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.config import ConfigError  # noqa: E402
from core.distributed import exit_process, rank_env  # noqa: E402
from launcher.config import JobConfig, load_job  # noqa: E402
from launcher.trainer import train  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job(lambda: load_job(args.job, args.overrides))


def run_job(make_job: Callable[[], JobConfig]) -> int:
    """Train the job `make_job` builds; a config error is one line from rank 0 and exit status 2."""
    is_main = rank_env().rank == 0
    try:
        train(make_job())
    except ConfigError as e:
        if is_main:
            print(f"config error: {e}", file=sys.stderr, flush=True)
        else:  # every rank finds the same mistake: give rank 0 time to say it before torchrun stops it
            time.sleep(3)
        return 2
    return 0


if __name__ == "__main__":
    exit_process(main())
