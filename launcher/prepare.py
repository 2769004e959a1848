"""lawa-prepare: prepare a job's data dir before training (tokenize its text, check its token files).

    lawa-prepare --job jobs/gpt2_125m.yaml data.sources='[{path: /data/owt}]' data.tokenizer=/models/gpt2
    python -m launcher.prepare --job JOB [overrides] [--processes N] [--unit-mb MB] [--force]

Uses every core it may run on (Slurm's --cpus-per-task: slurm/prepare.sh), prints a progress line
every few seconds (documents, tokens, rate, ETA), and keeps what it finished if it is killed: the
same command then goes on from there. At the end it says how many epochs of the data the job's
steps read. Training needs the data dir prepared: lawa-train prepares it before any rank starts; a
multi-rank torchrun/srun on an unprepared one stops with one line naming this command.
"""
from __future__ import annotations

import argparse
import sys

from core.config import ArgumentParser, ConfigError
from core.log import setup_logging
from launcher.config import load_job
from launcher.data.preparation import UNIT_MB, default_processes, prepare_if_needed, prepared
from launcher.plan import data_lines


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="lawa-prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--force", action="store_true", help="prepare again even if data.dir is prepared")
    parser.add_argument("--processes", type=int, default=None,
                        help=f"worker processes (default: the cores this process may use, {default_processes()} here)")
    parser.add_argument("--unit-mb", type=float, default=UNIT_MB,
                        help="the largest piece of text one process tokenizes at a time, in MB (default %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    try:
        if args.processes is not None and args.processes < 1:
            raise ConfigError(f"--processes: must be >= 1, got {args.processes}")
        if args.unit_mb <= 0:
            raise ConfigError(f"--unit-mb: must be positive, got {args.unit_mb}")
        job = load_job(args.job, args.overrides)
        manifest = None if args.force else prepared(job.data)
        if manifest is not None:
            print(f"{job.data.dir} is already prepared (--force prepares it again)")
        else:
            manifest = prepare_if_needed(job.data, progress=True, processes=args.processes, unit_mb=args.unit_mb,
                                         force=args.force)
        for line in data_lines(job, manifest):
            print(line)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
