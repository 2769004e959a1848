"""The front command: check a job in this one process, then start the ranks.

    python -m launcher.run --nproc-per-node 2 [--job JOB] [overrides]        # also: lawa-train ...
    python -m launcher.run --nproc-per-node 8 --nnodes 2 --rdzv-endpoint=node1:29400 --job ...
    python -m launcher.run --launcher deepspeed --nproc-per-node 8 --job ...

Before any rank starts it loads and validates the job (keys, types, combinations), the layout
against the process count (parallel.tensor and the batch sizes against nnodes × nproc-per-node),
that no live run holds its run directory, and that what the job reads is there (data sources, tokenizer, init_from / growth runs, the
evaluation tasks and their data, offline). A bad job is one line and exit status 2, with no rank,
no rendezvous and no JIT build started. Then it prepares the data dir if it is not prepared yet
(in this one process, with every core and progress lines: no rank ever waits on another's
tokenization; several nodes' front commands on one shared data dir take turns), says how many
epochs of it the run reads, and becomes `torchrun` (or the DeepSpeed launcher) on launcher/train.py
with the same job and overrides; other launcher options pass through as given (write them
`--option=value`). `--check` stops after the checks; `--no-launch` after preparing (what
slurm/pretrain.sh runs before srun). `torchrun ... launcher/train.py` directly works as before,
once the data dir is prepared.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from core.config import ConfigError, need

TRAIN = str(Path(__file__).resolve().parent / "train.py")


def check(job, world_size: Optional[int]) -> str:
    """Everything that can be checked before a rank starts; returns the layout line. Raises ConfigError."""
    from launcher.data.sources import resolve_source

    if world_size is not None:
        dp = job.parallel.data_parallel(world_size)
        job.train.accumulation_steps(dp)
    for i, source in enumerate(job.data.sources):
        try:
            resolve_source(i, source)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
    for key, path in (("data.tokenizer", job.data.tokenizer), ("checkpoint.init_from", job.checkpoint.init_from),
                      ("checkpoint.branch_from", job.checkpoint.branch_from), ("growth.from_run", job.growth.from_run)):
        need(path is None or os.path.exists(path), f"{key}: no such file or directory: {path!r}")
    if job.eval.all_tasks:  # the sidecar would stop on them only after training started
        from averaging.harness import HarnessTaskError, load_tasks

        try:
            load_tasks(job.eval.all_tasks, job.eval.harness_include)
        except HarnessTaskError as e:
            key = "eval.tasks" if e.task in job.eval.tasks else "eval.harness_tasks"
            raise ConfigError(f"{key}: {e}") from None
    from core.run_lock import RunLock

    holder = RunLock(job.resolved_run_dir).holder()
    need(holder is None, f"run_dir {job.resolved_run_dir} is in use by {holder.describe() if holder else ''}, which is "
                         f"still running: stop it first (or choose another run_dir)")
    if world_size is None:
        return f"{job.name}: layout checked by the ranks (an elastic node count)"
    accumulation = job.train.accumulation_steps(world_size // job.parallel.tensor)
    return (f"{job.name}: world {world_size} = tensor {job.parallel.tensor} × data {world_size // job.parallel.tensor}, "
            f"{accumulation} accumulation step{'s' if accumulation != 1 else ''}")


def ready_data(job, prepare: bool) -> list[str]:
    """The data dir's state as lines (the epochs the run reads, its warning), preparing it first when
    `prepare` and it is not prepared. Raises ConfigError (one line naming the key or file)."""
    from launcher.data.preparation import prepare_if_needed, prepared
    from launcher.plan import data_lines

    try:
        manifest = prepare_if_needed(job.data) if prepare else prepared(job.data)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None
    if manifest is None:
        return [f"data: {job.data.dir} is not prepared yet: lawa-train prepares it before any rank starts "
                f"(or lawa-prepare, slurm/prepare.sh ahead of the job)"]
    job.model.resolve(int(manifest["vocab_size"]), job.data.seq_len, job.parallel.tensor)  # its vocab fits the model
    return data_lines(job, manifest)


def launch_command(launcher: str, nproc: int, nnodes: str, passthrough: list[str], job: Optional[str],
                   overrides: list[str]) -> list[str]:
    train = [TRAIN, *(["--job", job] if job else []), *overrides]
    bin_dir = Path(sys.executable).parent
    if launcher == "deepspeed":
        exe = str(bin_dir / "deepspeed") if (bin_dir / "deepspeed").exists() else shutil.which("deepspeed") or "deepspeed"
        return [exe, "--num_gpus", str(nproc), *passthrough, *train]
    exe = str(bin_dir / "torchrun") if (bin_dir / "torchrun").exists() else shutil.which("torchrun") or "torchrun"
    single = nnodes == "1" and not any(a.startswith(("--rdzv", "--master")) for a in passthrough)
    return [exe, *(["--standalone"] if single else [f"--nnodes={nnodes}"]), f"--nproc-per-node={nproc}", *passthrough,
            *train]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lawa-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1, dest="nproc")
    parser.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX (elastic: the layout is checked by the ranks)")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--check", action="store_true", help="check the job and exit (0: it would start)")
    parser.add_argument("--no-launch", action="store_true",
                        help="check the job, prepare its data dir if needed, and exit without starting ranks")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args, passthrough = parser.parse_known_args(argv)
    try:
        from launcher.config import load_job

        need(args.nproc >= 1, f"--nproc-per-node: must be >= 1, got {args.nproc}")
        nodes = int(args.nnodes) if args.nnodes.isdigit() else None
        need(nodes is None or nodes >= 1, f"--nnodes: must be >= 1, got {args.nnodes}")
        stray = [a for a in args.overrides if "=" not in a]
        need(not stray, f"{stray[0] if stray else ''!r} is not of the form section.key=value "
                        "(launcher options with a value are written --option=value)")
        job = load_job(args.job, args.overrides)
        layout = check(job, nodes * args.nproc if nodes else None)
        print(f"job ok: {layout}", flush=True)
        if not args.check:
            from core.log import setup_logging

            setup_logging()  # preparation's progress lines
        for line in ready_data(job, prepare=not args.check):
            print(line, flush=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    cmd = launch_command(args.launcher, args.nproc, args.nnodes, passthrough, args.job, args.overrides)
    if args.check:
        print("would run: " + " ".join(cmd))
        return 0
    if args.no_launch:
        print("ready: the ranks may start (srun launcher/train.py, torchrun, deepspeed) with this job")
        return 0
    print("$ " + " ".join(cmd), flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
