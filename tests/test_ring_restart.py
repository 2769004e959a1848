"""The snapshot ring as a restart point (snapshot.restart_every), with real torchrun worker restarts."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from averaging import slots
from conftest import BIN, REPO, kill_tree, launcher_env, step_losses, torchrun, wait_for
from core.files import step_name

# Restart points at steps 10, 20, 30, 40; no checkpoint before the end.
ARGS = ["snapshot.every=5", "snapshot.restart_every=2", "train.steps=40", "checkpoint.every=1000", "logging.every=1",
        "eval.every=0", "ema.enabled=true"]


def smoke(data_dir: str, run_dir: Path, *extra: str) -> list[str]:
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run_dir}",
            f"snapshot.dir={run_dir / 'snaps'}", *ARGS, *extra]


def restart_slot_at_least(snaps: Path, step: int):
    return lambda: any(s >= step and c and (Path(p) / slots.RESTART).is_dir() for s, p, c in slots.list_slots(str(snaps)))


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1",
                             "launcher/train.py", *args], cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_one_trainer(proc: subprocess.Popen) -> None:
    trainers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launcher/train.py" in " ".join(p.cmdline())]
    assert len(trainers) == 2, trainers
    trainers[-1].send_signal(signal.SIGKILL)


def same_shards(a: Path, b: Path, step: int, kind: str) -> bool:
    pairs = [(slots.read_shard(str(a / step_name(step)), dp, 0, kind=kind)[0],
              slots.read_shard(str(b / step_name(step)), dp, 0, kind=kind)[0]) for dp in (0, 1)]
    return all(torch.equal(x, y) for left, right in pairs for x, y in zip(left, right))


@pytest.mark.parametrize("stage", [1, 3])
def test_a_killed_trainer_resumes_from_the_rings_restart_slot_exactly_and_a_corrupt_one_is_passed_over(
        pydoc_data, tmp_path, stage):
    """kill -9 of one trainer under torchrun --max-restarts=1, no checkpoint written yet: the
    restarted workers resume from the newest restart slot in the ring (weights, AdamW moments and
    step counts, EMA), and every later step's loss, the final weights and the final EMA equal an
    uninterrupted run's, bit for bit. Then the whole job is killed; with the newest restart slot's
    moments file corrupted, the same command passes over it in one line and resumes from the one
    before, still exactly."""
    stage_arg = f"parallel.zero_stage={stage}"
    plain = tmp_path / "plain"
    torchrun(2, *smoke(pydoc_data, plain, stage_arg))

    run = tmp_path / "killed"
    proc = start(smoke(pydoc_data, run, stage_arg))
    try:
        wait_for(restart_slot_at_least(run / "snaps", 20), 240, "a restart slot at step 20")
        kill_one_trainer(proc)
        out, _ = proc.communicate(timeout=300)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out[-3000:]
    resumed = re.search(r"resumed from the ring's restart slot of step (\d+) in \S+: no checkpoint yet", out)
    assert resumed and int(resumed.group(1)) in (20, 30, 40), out[-3000:]
    assert step_losses(run) == step_losses(plain)
    assert same_shards(run / "snaps", plain / "snaps", 40, "raw") and same_shards(run / "snaps", plain / "snaps", 40, "ema")

    # Another run, killed whole once its restart slot of step 20 is committed; the newest restart slot's
    # moments are then damaged, and so is every checkpoint it wrote (every 10 steps): the ring is still
    # tried (before, a run none of whose checkpoints verified stopped there, ring or not).
    again = tmp_path / "again"
    proc = start(smoke(pydoc_data, again, stage_arg, "checkpoint.every=10"))
    try:
        wait_for(restart_slot_at_least(again / "snaps", 20), 240, "a restart slot at step 20")
        kill_tree(proc.pid)
    finally:
        kill_tree(proc.pid)
    committed = [s for s, p, c in slots.list_slots(str(again / "snaps")) if c and (Path(p) / slots.RESTART).is_dir()]
    newest = max(committed)
    moments = again / "snaps" / step_name(newest) / slots.moments_file(1, 0)
    moments.write_bytes(moments.read_bytes()[:-8] + b"\0" * 8)
    checkpoints = sorted(p for p in (again / "checkpoints").iterdir() if (p / "run_state.json").exists())
    assert checkpoints, "the run was killed before its first checkpoint"
    for checkpoint in checkpoints:
        first = sorted(json.loads((checkpoint / "run_state.json").read_text())["files"])[0]
        os.truncate(checkpoint / first, 100)
    out = torchrun(2, *smoke(pydoc_data, again, stage_arg, "checkpoint.every=10")).stdout
    older = max(s for s in committed if s < newest)
    assert f"the ring's restart slot of step {newest} cannot be used (" in out and "does not match" in out, out[-3000:]
    assert f"resumed from the ring's restart slot of step {older} in" in out, out[-3000:]
    assert (f"checkpoint {checkpoints[-1].name} does not verify (" in out
            and f"resuming from the ring's restart slot of step {older} instead (set aside: "
                f"{checkpoints[-1].name}.unverified" in out), out[-3000:]
    assert all((again / "checkpoints" / f"{p.name}.unverified").is_dir() for p in checkpoints)
    assert step_losses(again) == step_losses(plain)

    if stage == 1:  # A new run whose ring is at the same path never resumes from that one's slots.
        other = tmp_path / "other"
        out = torchrun(2, *smoke(pydoc_data, other, stage_arg, f"snapshot.dir={again / 'snaps'}")).stdout
        assert "resumed from the ring" not in out and step_losses(other) == step_losses(plain)


def test_folders_cross_a_ring_of_ranks_whole_and_what_cannot_be_kept_is_refused_in_step(tmp_path):
    """core.file_transfer, as buddy copies use it: three gloo ranks each send a folder to the next
    and receive the previous one's at once (several chunks each way, one rank sending nothing), and
    every file arrives as sent; a file named outside the receiving folder, or one that cannot be
    written, is refused, and the next transfer between the two ranks still arrives whole."""
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=3", "tests/file_transfer_worker.py",
                           str(tmp_path)], cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("] ok") == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
