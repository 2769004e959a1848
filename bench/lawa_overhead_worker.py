"""Figure 2b of bench/lawa_overhead_cpu.py: one rank of

    torchrun --nproc_per_node 2 bench/lawa_overhead_worker.py --out R.json --dir D --shm S --job JOB -- overrides

builds the launcher's training setup from the job (launcher.trainer.build: the same engine, data
and layout as a real run), trains a few steps, then
  - snapshots with `SnapshotWriter.vote` + `after_step` on due steps: `stall` is what after_step
    returns as snapshot_stall_s (the copy of the fp32 partition), `after_step` the wall time of both
    (one vote, the copy, starting the writer thread); `commit` is the wall time of a vote on the
    next step, which commits the finished slot; `write` is the time `join_write` waits for the
    background write (nothing else runs meanwhile). Median over snapshots of the slowest rank's value;
  - `engine.save_checkpoint(dir, tag)` between barriers, to disk (beside the run dir) and to
    /dev/shm; median of 3 of the slowest rank.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from common import dir_bytes, median


def run(args: argparse.Namespace) -> int:
    from core.distributed import barrier, gather_objects
    from launcher import trainer
    from launcher.config import load_job
    from launcher.snapshot import SnapshotArgs, SnapshotWriter
    from models.registry import count_parameters

    job = load_job(args.job, args.overrides)
    t = trainer.build(job)
    par, engine = t.par, t.engine
    snap_root = str(Path(args.shm) / "snapshots")
    writer = SnapshotWriter(SnapshotArgs(every=2, slots=4, dir=snap_root), engine, par, snap_root, resume_step=0)

    def timed_step(step: int) -> float:
        start = time.perf_counter()
        trainer.train_step(t, step - 1, writer)
        return time.perf_counter() - start

    tokens_per_step = job.train.global_batch_size * job.data.seq_len
    step, step_s = 0, []
    for _ in range(args.warmup_steps):
        step += 1
        step_s.append(timed_step(step))

    # Snapshots: due on even steps (every=2); the odd step after each one commits it.
    stall, after_wall, commit_wall, write_s = [], [], [], []
    for _ in range(args.snapshots):
        step += 1
        if step % 2:  # make the snapshot step even
            step_s.append(timed_step(step))
            step += 1
        step_s.append(timed_step(step))
        barrier()
        start = time.perf_counter()
        writer.vote()  # the loop's vote at a snapshot step (its snapshot part)
        stats = writer.after_step(step, step * tokens_per_step, job.optimizer.lr)
        returned = time.perf_counter()
        if "snapshot_stall_s" not in stats:
            raise RuntimeError(f"no snapshot taken at step {step}: {stats}")
        stall.append(stats["snapshot_stall_s"] + stats.get("snapshot_wait_s", 0.0))
        after_wall.append(returned - start)
        writer.join_write()
        write_s.append(time.perf_counter() - returned)
        step += 1
        step_s.append(timed_step(step))
        start = time.perf_counter()
        writer.vote()  # the next vote commits it
        writer.after_step(step, step * tokens_per_step, job.optimizer.lr)  # not due: nothing more
        commit_wall.append(time.perf_counter() - start)
        if writer.last_committed != step - 1:
            raise RuntimeError(f"snapshot of step {step - 1} was not committed (last: {writer.last_committed})")
    slot_bytes = dir_bytes(writer.slot_dir(writer.last_committed)) if par.local_rank == 0 else 0

    # DeepSpeed's synchronous checkpoint of the same engine, to disk and to /dev/shm.
    saves: dict[str, list[float]] = {}
    ckpt_bytes: dict[str, int] = {}
    for where, root in (("disk", Path(args.dir) / "bench_checkpoints"), ("shm", Path(args.shm) / "checkpoints")):
        saves[where] = []
        for i in range(args.saves):
            tag = f"bench_{i}"
            barrier()
            start = time.perf_counter()
            engine.save_checkpoint(str(root), tag=tag, client_state={"run_state": {"step": step}}, save_latest=False)
            barrier()
            saves[where].append(time.perf_counter() - start)
            if par.is_main:
                ckpt_bytes[where] = dir_bytes(str(root / tag))
                shutil.rmtree(root / tag, ignore_errors=True)
            barrier()

    # The slowest rank's value of each sample (the loop waits for it at the next collective).
    mine = {"stall": stall, "after_wall": after_wall, "commit_wall": commit_wall, "write": write_s,
            "step": step_s[1:], **{f"save_{w}": v for w, v in saves.items()}}
    gathered = gather_objects(mine, par.ctrl_group)
    writer.cleanup()
    if par.is_main:
        slowest = {key: [max(g[key][i] for g in gathered) for i in range(len(mine[key]))] for key in mine}
        result = {
            "job": args.job, "overrides": [o for o in args.overrides if not o.startswith(("data.dir", "run_dir"))],
            "model": job.model.size, "params": count_parameters(t.model_config), "seq_len": job.data.seq_len,
            "global_batch_size": job.train.global_batch_size, "micro_batch_size": job.train.micro_batch_size,
            "partition_elements_per_rank": writer.partition_elements, "slot_bytes": slot_bytes,
            "checkpoint_bytes_disk": ckpt_bytes.get("disk"), "checkpoint_bytes_shm": ckpt_bytes.get("shm"),
            "samples": slowest,
            "train_step_s": median(slowest["step"]),
            "stall_s": median(slowest["stall"]),
            "after_step_s": median(slowest["after_wall"]),
            "commit_step_s": median(slowest["commit_wall"]),
            "write_s": median(slowest["write"]),
            "save_checkpoint_disk_s": median(slowest["save_disk"]),
            "save_checkpoint_shm_s": median(slowest["save_shm"]),
        }
        result["ratio_save_disk_over_stall"] = result["save_checkpoint_disk_s"] / result["stall_s"]
        result["ratio_save_disk_over_after_step"] = result["save_checkpoint_disk_s"] / result["after_step_s"]
        result["ratio_save_shm_over_stall"] = result["save_checkpoint_shm_s"] / result["stall_s"]
        with open(args.out, "w") as f:
            json.dump(result, f)
    barrier()
    return 0


def main() -> None:
    from core.distributed import exit_process

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--shm", required=True)
    parser.add_argument("--snapshots", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_process(run(parser.parse_args()))


if __name__ == "__main__":
    main()
