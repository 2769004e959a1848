"""Real multi-process ZeRO-3 runs: `torchrun --nproc_per_node 2` (and the deepspeed launcher) on gloo."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import BIN, read_metrics, run_launcher, step_losses, torchrun

pytestmark = pytest.mark.distributed


def smoke_args(data_dir: str, run_dir: Path, *extra: str) -> list[str]:
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


def test_two_rank_run_learns_and_leaves_a_complete_run_dir(pydoc_data, tmp_path):
    """Started as users start it: the front command checks the job, then becomes torchrun."""
    run = tmp_path / "run"
    proc = run_launcher([sys.executable, "-m", "launcher.run", "--nproc-per-node", "2",
                         *smoke_args(pydoc_data, run, "train.steps=30", "eval.every=10", "checkpoint.every=10",
                                     "checkpoint.keep=2")])
    assert "job ok: smoke: world 2 = tensor 1 × data 2, 2 accumulation steps" in proc.stdout
    assert "--standalone --nproc-per-node=2" in proc.stdout
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 1.0, losses  # it learns, not just wiggles
    vals = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0]
    records = [r for r in read_metrics(run) if "tokens_per_s" in r]
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] is not None for r in records)
    assert records[-1]["tokens"] == 30 * 8 * 64
    # Resolved config and the generated DeepSpeed config are in the run directory.
    assert "global_batch_size: 8" in (run / "config.yaml").read_text()
    assert yaml.safe_load((run / "config.yaml").read_text())["parallel"]["zero_stage"] == 1  # the stage chosen, not auto
    # parallel.zero_stage: auto chose the lowest stage that fits this machine, and said why.
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_accumulation_steps"] == 2
    assert "ZeRO stage 1 (auto: the lowest stage whose GPU and host memory fit)" in proc.stdout
    # Only the newest `keep` checkpoints stay, each complete, and `latest` names the newest.
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000020", "step_00000030"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000030"
    for rank in (0, 1):  # DeepSpeed's ZeRO-1 files: each rank's optimizer partition, one model-states file
        assert (run / "checkpoints/step_00000030" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").exists()
    assert (run / "checkpoints/step_00000030" / "mp_rank_00_model_states.pt").exists()
    assert "world 2 = tensor 1 × data 2" in proc.stdout


# One uninterrupted run that the stop/resume tests compare against (dropout on: its masks must resume
# too), at ZeRO-3; the stop/resume runs at ZeRO-2 and ZeRO-1 (auto, on CPU): all three stages give
# the same losses (fp32: to within 1e-7 here), so each resumed run must equal it.
UNINTERRUPTED = ["train.steps=24", "checkpoint.every=2", "eval.every=4", "logging.every=1", "model.dropout=0.1"]


@pytest.fixture(scope="module")
def uninterrupted(pydoc_data, tmp_path_factory) -> Path:
    whole = tmp_path_factory.mktemp("uninterrupted") / "whole"
    torchrun(2, *smoke_args(pydoc_data, whole, *UNINTERRUPTED, "parallel.zero_stage=3"))
    return whole


def test_resume_after_a_stop_repeats_the_uninterrupted_losses(pydoc_data, uninterrupted, tmp_path):
    common = [*UNINTERRUPTED, "checkpoint.keep=3", "parallel.zero_stage=2"]
    parts = tmp_path / "parts"
    first = torchrun(2, *smoke_args(pydoc_data, parts, *common, "train.stop_at=3"))
    assert "stopped at step 3" in first.stdout
    # The stop wrote a checkpoint at step 3; the same command without stop_at resumes from it.
    second = torchrun(2, *smoke_args(pydoc_data, parts, *common, "train.stop_at=5"))
    assert "at step 3" in second.stdout
    # A crash while saving step 5: its folder lacks run_state.json. And on rank 1 only, step 4's file
    # cannot even be opened (a link loop): an I/O error is a failure to verify, the same verdict on every
    # rank (before, rank 1 raised while rank 0 waited for it). A folder of an earlier fallback has the
    # usual set-aside name: this one gets a name of its own (before, the rename failed and the run stopped).
    (parts / "checkpoints/step_00000005/run_state.json").unlink()
    broken = parts / "checkpoints/step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    broken.unlink()
    broken.symlink_to(broken.name)
    (parts / "checkpoints/step_00000004.unverified").mkdir()
    (parts / "checkpoints/step_00000004.unverified/from_before").write_text("x")
    third = torchrun(2, *smoke_args(pydoc_data, parts, *common))
    assert "resumed from" in third.stdout and "at step 3" in third.stdout
    assert (f"checkpoint step_00000004 does not verify ({parts / 'checkpoints/step_00000004'}: [Errno 40] Too many "
            f"levels of symbolic links: '{broken}'); resuming from step_00000003 instead (set aside: "
            f"step_00000004.unverified-2)") in third.stdout, third.stdout[-3000:]
    assert (parts / "checkpoints/step_00000004.unverified-2").is_dir()
    assert (parts / "checkpoints/step_00000004.unverified/from_before").exists()

    expected, got = step_losses(uninterrupted), step_losses(parts)  # a step logged twice: the later wins
    assert sorted(got) == list(range(1, 25))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, expected, got)
    def val(run):
        return {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert val(parts)[24] == pytest.approx(val(uninterrupted)[24], rel=1e-6)


def test_deepspeed_launcher_trains_on_cpu_in_bf16(pydoc_data, tmp_path):
    run = tmp_path / "ds"
    proc = run_launcher([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29731", "launcher/train.py",
                         *smoke_args(pydoc_data, run, "train.steps=6", "train.precision=bf16")])
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and losses[6] < losses[1]
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["bf16"]["enabled"] is True
    assert "bf16" in proc.stdout


def test_single_process_run_without_a_launcher(pydoc_data, tmp_path):
    run = tmp_path / "single"
    proc = run_launcher([sys.executable, "launcher/train.py", *smoke_args(pydoc_data, run, "train.steps=2")])
    assert "world 1 = tensor 1 × data 1" in proc.stdout
    assert sorted(step_losses(run)) == [1, 2]


def test_a_config_mistake_is_one_line_not_a_traceback(tmp_path):
    proc = run_launcher([sys.executable, "launcher/train.py", "--job", "jobs/smoke.yaml", "optimizer.lrr=1"],
                        check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: unknown key 'optimizer.lrr'")
    assert "Traceback" not in proc.stderr


def test_layout_mistake_is_reported_before_training(pydoc_data, tmp_path):
    proc = torchrun(2, *smoke_args(pydoc_data, tmp_path / "r", "train.global_batch_size=6",
                                   "train.micro_batch_size=2"), check=False)
    assert proc.returncode != 0
    assert "config error: train.global_batch_size=6 is not divisible by train.micro_batch_size × " \
           "data-parallel size = 2 × 2" in proc.stderr


def test_a_signal_to_one_rank_stops_all_ranks_at_the_same_step_and_the_run_resumes_exactly(pydoc_data, uninterrupted,
                                                                                             tmp_path):
    """SIGUSR1 reaches one worker only; the per-step vote stops both after the same step, with a
    checkpoint; the same command resumes, and the losses equal an uninterrupted run's."""
    import subprocess
    import time

    import psutil

    from conftest import REPO, launcher_env

    steps = UNINTERRUPTED
    run = tmp_path / "signalled"
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
           *smoke_args(pydoc_data, run, *steps)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and len(step_losses(run)) >= 6):
        time.sleep(0.1)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "launcher/train.py" in " ".join(p.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    stopped = max(step_losses(run))
    assert 6 <= stopped < 24 and f"stopped at step {stopped} on" in out
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "run_state.json").exists()

    torchrun(2, *smoke_args(pydoc_data, run, *steps))
    expected, got = step_losses(uninterrupted), step_losses(run)
    assert sorted(got) == list(range(1, 25))
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-6) for s in expected)


def test_a_checkpoint_is_held_to_its_records_and_none_verifying_is_one_line_with_the_way_out(pydoc_data, tmp_path):
    """Every file a checkpoint reads is held to its records: an EMA/SWA file planted in a checkpoint
    that never had one (before: loaded unverified, as the run's own averages) fails it, and the run
    resumes from the one before. When none verifies and there is no ring to resume from, the run stops
    in one line that says how to start afresh."""
    run = tmp_path / "run"
    alone = [sys.executable, "launcher/train.py"]
    run_launcher([*alone, *smoke_args(pydoc_data, run, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=2",
                                      "snapshot.every=0")])
    planted = run / "checkpoints/step_00000002/averages_dp0_tp0.pt"
    torch.save({"ema": [torch.full((4,), 7.0)], "ema_updates": 10**6, "swa": None, "swa_count": 0}, planted)
    second = run_launcher([*alone, *smoke_args(pydoc_data, run, "train.steps=3", "checkpoint.every=1",
                                               "checkpoint.keep=2", "snapshot.every=1", "snapshot.restart_every=0",
                                               f"snapshot.dir={tmp_path / 'snaps'}", "ema.enabled=true")])
    assert (f"checkpoint step_00000002 does not verify ({planted} is not among the files its checkpoint records); "
            f"resuming from step_00000001 instead (set aside: step_00000002.unverified)") in second.stdout, second.stdout
    assert sorted(step_losses(run)) == [1, 2, 3]

    for checkpoint in (run / "checkpoints").glob("step_*[0-9]"):
        for name in json.loads((checkpoint / "run_state.json").read_text())["files"]:
            os.truncate(checkpoint / name, 10)
    third = run_launcher([*alone, *smoke_args(pydoc_data, run, "train.steps=4", "snapshot.every=0")], check=False)
    assert third.returncode == 2, third.stdout[-2000:] + third.stderr[-2000:]
    ckpts = run / "checkpoints"
    line = third.stderr.strip().splitlines()[-1]
    assert line.startswith(f"config error: no checkpoint in {ckpts} verifies (newest: step_00000003: {ckpts}/step_00000003/")
    assert line.endswith(
        f"and the ring holds no restart point of this run to resume from; to start afresh, move {ckpts} away or "
        f"choose another run_dir"), line
