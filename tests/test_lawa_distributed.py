"""Online LAWA with real processes: 2 trainer ranks + 2 sidecar ranks (ZeRO-3 on gloo)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from averaging import slots
from averaging.lawa import average_state_dicts
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, kill_tree, launcher_env, read_metrics, run_launcher, step_losses, torchrun, wait_for
from core import pickles
from core.files import step_name
from run_checks import single_process_val_loss, smoke

pytestmark = pytest.mark.distributed

LAWA = ["snapshot.every=2", "snapshot.slots=8", "lawa.k=3", "lawa.spacing=2"]
# A constant LR after warmup, checkpoints at 6 and 12 (and 2, kept for the cooldown the job schedules
# from it): the parent of the cooldown branch tests.
STABLE = ["schedule.name=constant", "checkpoint.every=6", "checkpoint.keep=2", "cooldowns.at=[2]", "cooldowns.steps=4"]
# Beside LAWA (the headline), one merge per schedule-derived weighting; 3072 tokens = 6 smoke steps.
MERGES = ("lawa.merges=[{name: lawa}, {name: lin, window_tokens: 3072, weights: linear}, "
          "{name: cos, k: 4, weights: cosine}, {name: sqrt, window_tokens: 3072, weights: 1-sqrt}]")


def consolidate(parent: Path, step: int) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(parent), tag=step_name(step))


def held_ports(count: int) -> tuple[int, list[socket.socket]]:
    """A port P free now, with P+1 .. P+count-1 taken by listening sockets (returned, to close)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("", 0))
            base = probe.getsockname()[1]
        held = []
        try:
            for port in range(base + 1, base + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("", port))
                sock.listen()
            return base, held
        except OSError:
            for sock in held:
                sock.close()
    raise AssertionError("no run of free ports")


@pytest.fixture(scope="module")
def lawa_run(pydoc_data, tmp_path_factory) -> Path:
    """The shared run. Its master port's next three ports are taken, as another job's would be on a
    shared node under Slurm (which derives the master port from the job id): the sidecar's rendezvous
    must not be derived from the master port (it once was MASTER_PORT + 1 + its restart count)."""
    run = tmp_path_factory.mktemp("lawa") / "run"
    port, held = held_ports(4)
    try:
        proc = run_launcher([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "launcher/train.py",
                             *smoke(pydoc_data, run, *LAWA, MERGES, *STABLE, "train.steps=12", "logging.every=2",
                                    "eval.every=6", "sidecar.enabled=true")])
    finally:
        for sock in held:
            sock.close()
    assert "raw vs the merges, validation loss" in proc.stdout, proc.stdout[-3000:]
    assert "sidecar died" not in proc.stdout and "generation 0" in proc.stdout
    (run.parent / "stdout.txt").write_text(proc.stdout)
    return run


@pytest.mark.parametrize("name, weighting, steps", [("lawa", "uniform", [8, 10, 12]), ("lin", "linear", [6, 8, 10, 12]),
                                                     ("cos", "cosine", [6, 8, 10, 12]), ("sqrt", "1-sqrt", [6, 8, 10, 12])])
def test_every_merge_is_scored_and_its_best_consolidates_to_the_weighted_average(lawa_run, name, weighting, steps):
    """For each weighting: the final record scores the merge over its window with the derived
    weights, and DeepSpeed's zero_to_fp32 of the merge's best slot equals the weighted average of
    the zero_to_fp32 of its sources (the sidecar never consolidated anything)."""
    from averaging.lawa import merge_weights

    final = read_eval_log(str(lawa_run))[-1]
    assert final["step"] == 12 and final["skipped"] == [] and list(final["merges"])[0] == "lawa"
    entry = final["merges"][name]
    assert entry["steps"] == steps[::-1]
    assert entry["weights"] == pytest.approx(merge_weights(steps, weighting)[::-1])
    folder = lawa_run / ("lawa_best" if name == "lawa" else f"merges/{name}")
    (best_step,) = slots.committed_steps(str(folder))
    manifest = slots.read_manifest(str(folder / step_name(best_step)))
    assert manifest.merge == name and manifest.val_loss == pytest.approx(
        {r["step"]: r for r in read_eval_log(str(lawa_run))}[best_step][f"{name}_val_loss"])
    sources = [consolidate(lawa_run / "snaps", s) for s in manifest.steps_averaged]
    reference = average_state_dicts(sources, manifest.merge_weights)
    merged = consolidate(folder, best_step)
    assert max((merged[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    if best_step == 12:  # scored as a single process scores the same weights
        assert final[f"{name}_val_loss"] == pytest.approx(single_process_val_loss(lawa_run, reference), rel=1e-5)


def test_sidecar_evaluates_the_final_average_of_spaced_committed_slots(lawa_run):
    records = read_eval_log(str(lawa_run))
    final = records[-1]
    assert final["step"] == 12 and final["k"] == 3 and final["steps_averaged"] == [12, 10, 8]
    assert all(math.isfinite(r["raw_val_loss"]) and math.isfinite(r["lawa_val_loss"]) for r in records)
    # The sidecar scores the raw slot exactly as the trainer scored its own weights at that step.
    trainer_val = {r["step"]: r["val_loss"] for r in read_metrics(lawa_run) if "val_loss" in r}
    assert final["raw_val_loss"] == pytest.approx(trainer_val[12], rel=1e-6)
    # Every committed slot is complete and passes its checksums; the sidecar exited after the last.
    committed = slots.committed_steps(str(lawa_run / "snaps"))
    assert committed == [2, 4, 6, 8, 10, 12]
    for step in committed:
        for dp_rank in (0, 1):
            slots.read_shard(str(lawa_run / "snaps" / step_name(step)), dp_rank, 0)
    left = subprocess.run(["pgrep", "-f", f"averaging.sidecar --run-dir {lawa_run}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_consolidated_sidecar_average_equals_average_of_consolidated_slots(lawa_run):
    """DeepSpeed's own zero_to_fp32 is the oracle: the sidecar never consolidated anything."""
    best_root = lawa_run / "lawa_best"
    (best_step,) = slots.committed_steps(str(best_root))
    manifest = slots.read_manifest(str(best_root / step_name(best_step)))
    assert manifest.kind == "lawa" and len(manifest.steps_averaged) >= 1
    averaged = consolidate(best_root, best_step)
    reference = average_state_dicts([consolidate(lawa_run / "snaps", s) for s in manifest.steps_averaged])
    assert set(averaged) == set(reference)
    assert max((averaged[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6
    record = {r["step"]: r for r in read_eval_log(str(lawa_run))}[best_step]
    assert record["best"] and record["lawa_val_loss"] == pytest.approx(manifest.val_loss)


def test_sidecar_lawa_loss_equals_single_process_loss_of_the_consolidated_average(lawa_run):
    final = read_eval_log(str(lawa_run))[-1]
    reference = average_state_dicts([consolidate(lawa_run / "snaps", s) for s in final["steps_averaged"]])
    assert final["lawa_val_loss"] == pytest.approx(single_process_val_loss(lawa_run, reference), rel=1e-5)
    raw = consolidate(lawa_run / "snaps", final["step"])
    assert final["raw_val_loss"] == pytest.approx(single_process_val_loss(lawa_run, raw), rel=1e-5)


def test_training_losses_are_the_same_with_the_sidecar_on_and_off(lawa_run, pydoc_data, tmp_path):
    plain = tmp_path / "plain"
    torchrun(2, "--job", "jobs/smoke.yaml", f"data.dir={pydoc_data}", f"run_dir={plain}", "train.steps=12",
             "logging.every=2", "eval.every=6", *STABLE, "cooldowns.at=[]")  # a forecast needs the sidecar
    assert step_losses(plain) == step_losses(lawa_run)


def test_a_sidecar_that_fell_behind_leaves_a_bad_slot_out_and_scores_the_last_one_whatever_the_order(lawa_run,
                                                                                                    tmp_path):
    """The sidecar started by hand on a copy of the run while only slots 2 and 4 are committed
    scores 4. Then 6, 8 and 10 are committed, 10 with a manifest that cannot be read, and the
    trainers' done marker names 12 as their last snapshot before 12 shows up: the next start leaves
    10 out in one line and goes on, says it passed over 6, scores 8, waits for 12 (the marker
    vouches for it), scores it, and only then leaves."""
    import shutil

    from averaging.sidecar.protocol import SidecarSpec, mark_training_done

    copy = tmp_path / "copy"
    shutil.copytree(lawa_run, copy, ignore=shutil.ignore_patterns("checkpoints", "lawa_best", "merges", "eval.jsonl"))
    spec = SidecarSpec.read(str(copy))
    spec.snapshot_dir = str(copy / "snaps")
    spec.forecast_steps = []  # a cooldown's end would be scored before the newest (the next test)
    spec.write(str(copy))
    later = {s: copy / "snaps" / step_name(s) / "COMMITTED" for s in (6, 8, 10, 12)}
    for marker in later.values():
        marker.unlink()
    sidecar = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "averaging.sidecar",
               "--run-dir", str(copy)]
    run_launcher([*sidecar, "--once"])
    assert [r["step"] for r in read_eval_log(str(copy))] == [4]

    for s in (6, 8, 10):
        later[s].touch()
    (copy / "snaps" / step_name(10) / "manifest.json").write_text("{not json")
    mark_training_done(str(copy), 12, 12)  # as if the marker were read before 12's commit showed up
    proc = subprocess.Popen(sidecar, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_for(lambda: [r["step"] for r in read_eval_log(str(copy))] == [4, 8], 120, "step 8 scored")
        time.sleep(1.0)  # several polls with the marker set and 12 missing: the sidecar must stay
        assert proc.poll() is None
        later[12].touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out[-3000:]
    assert [r["step"] for r in read_eval_log(str(copy))] == [4, 8, 12]
    assert out.count("leaving out step 10: ") == 1 and "manifest.json cannot be read" in out, out[-3000:]
    assert "behind: step 6 was committed while step 4 was scored; scoring the newest, 8" in out
    assert read_eval_log(str(copy))[-1]["steps_averaged"] == [12, 8, 6]  # 10 left out of the merge too


def test_a_sidecar_behind_scores_where_a_scheduled_cooldown_ends_with_every_merge_before_the_newest(lawa_run,
                                                                                                    tmp_path):
    """The cooldown scheduled from step 2 ends at 6 (the spec's forecast_steps). A sidecar started
    on a copy of the finished run, every slot up to 12 committed, scores 6 first, with every merge
    (a sidecar behind skips all but the headline elsewhere), then 12."""
    import shutil

    from averaging.sidecar.protocol import SidecarSpec

    copy = tmp_path / "copy"
    shutil.copytree(lawa_run, copy, ignore=shutil.ignore_patterns("checkpoints", "lawa_best", "merges", "eval.jsonl"))
    spec = SidecarSpec.read(str(copy))
    assert spec.forecast_steps == [6]
    spec.snapshot_dir = str(copy / "snaps")
    spec.write(str(copy))
    out = run_launcher([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "averaging.sidecar",
                        "--run-dir", str(copy), "--once"]).stdout
    records = read_eval_log(str(copy))
    assert [r["step"] for r in records] == [6, 12]
    assert "scoring step 6, where a scheduled cooldown ends, before the newer 12" in out, out[-3000:]
    assert all(f"{m}_val_loss" in records[0] for m in ("lawa", "lin", "cos", "sqrt"))
    assert records[0]["steps_averaged"] == [6, 4, 2]
    original = {r["step"]: r for r in read_eval_log(str(lawa_run))}[6]
    assert records[0]["lawa_val_loss"] == pytest.approx(original["lawa_val_loss"], abs=1e-6)


def cooldown(run: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_launcher([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/cooldown.py",
                         str(run), *args], check=check)


def test_a_cooldown_branch_continues_the_parent_and_the_report_sets_it_beside_the_merges(lawa_run, tmp_path):
    from launcher.report import main as report
    from launcher.schedule import ScheduleArgs, lr_at

    cooldown(lawa_run, "--at", "6", "--steps", "6", "logging.every=1", "eval.every=3")
    branch = lawa_run.parent / "smoke_cd6_6"
    record = json.loads((branch / "branch.json").read_text())
    assert record["parent"] == str(lawa_run) and record["step"] == 6 and record["tokens"] == 6 * 512
    metrics = [r for r in read_metrics(branch) if "loss" in r]
    assert [r["step"] for r in metrics] == [7, 8, 9, 10, 11, 12]
    # The parent's weights, optimizer moments and place in the data: step 8's loss is the parent's
    # (the cooldown's first update is at the peak); after that the LR decays (1-sqrt to 0).
    parent = step_losses(lawa_run)
    assert metrics[1]["loss"] == parent[8]
    wsd = ScheduleArgs(name="wsd", warmup_steps=2, cooldown_steps=6, cooldown_start=6, cooldown_shape="1-sqrt",
                       min_lr_ratio=0.0)
    assert [r["lr"] for r in metrics] == pytest.approx([lr_at(s - 1, 3e-3, wsd, 12) for s in range(7, 13)])
    assert metrics[-1]["lr"] < 3e-3 / 2 and metrics[3]["loss"] != parent[10]
    assert not (branch / "snaps").exists() and not (branch / "eval.jsonl").exists()  # no sidecar in a branch

    out = tmp_path / "report"
    assert report([str(lawa_run), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    final = [r for r in read_metrics(branch) if "val_loss" in r][-1]
    assert final["step"] == 12 and f"**{final['val_loss']:.4f}**" in text
    assert "merges vs a real cooldown" in text and "| 1-sqrt, 6 steps from 6 | 12 | +6 steps" in text

    # Refused with one line: a step with no checkpoint, and a branch whose LR before the branch point
    # would not be the parent's.
    missing = cooldown(lawa_run, "--at", "4", "--steps", "2", check=False)
    assert missing.returncode != 0 and "has no complete checkpoint of step 4; it has 2, 6, 12" in missing.stderr
    decaying = cooldown(lawa_run, "--at", "6", "--steps", "2", "schedule.warmup_steps=1", check=False)
    assert decaying.returncode != 0 and "branch from the stable phase" in decaying.stderr


def test_the_cooldown_a_job_schedules_runs_after_it_and_is_forecast_by_the_merges_at_its_end(lawa_run):
    """cooldowns.at=[2], cooldowns.steps=4: after step 12 the same command branches a real cooldown
    from the checkpoint of step 2 (kept, though checkpoint.keep=2) for steps 3-6; each merge's
    forecast error is its score at step 6 in eval.jsonl minus the cooldown's loss at step 6."""
    from launcher.forecast import cooldowns_of, forecasts

    out = (lawa_run.parent / "stdout.txt").read_text()
    assert "cooldown 1/1: linear over 4 steps from step 2 (cooldowns.at)" in out
    branch = lawa_run.parent / "smoke_cd2_4_linear"
    assert json.loads((branch / "branch.json").read_text())["step"] == 2
    metrics = [r for r in read_metrics(branch) if "loss" in r]
    assert [r["step"] for r in metrics] == [4, 6]  # the parent's logging.every=2
    assert 3e-3 / 2 < metrics[0]["lr"] < 3e-3 and metrics[-1]["lr"] < 3e-3 / 2
    # The parent's state at step 2; the cooldown's first update (step 3) is at the peak, so the loss
    # at step 4 is the parent's, and the decay after it parts them.
    parent = step_losses(lawa_run)
    assert parent[4] == metrics[0]["loss"] and parent[6] != metrics[1]["loss"]
    cooldown_loss = [r["val_loss"] for r in read_metrics(branch) if "val_loss" in r and r["step"] == 6][0]

    records = read_eval_log(str(lawa_run))
    at_end = {r["step"]: r for r in records}[6]
    # (other tests branch their own cooldowns from this run)
    found = {f.cooldown.branch.step: f for f in forecasts(records, cooldowns_of(str(lawa_run)))}[2]
    assert found.cooldown.final == cooldown_loss
    for merge in ("lawa", "lin", "cos", "sqrt"):
        assert found.errors[merge] == pytest.approx(at_end[f"{merge}_val_loss"] - cooldown_loss, abs=1e-12)
    # The forecast (auto on a constant schedule: the headline merge)
    assert all(r["forecast"] == "lawa" and r["forecast_val_loss"] == r["lawa_val_loss"] for r in records)
    table = out[out.index("the merges vs real cooldowns at the same compute"):]
    assert f"| linear, 4 steps from 2 | 6 | {cooldown_loss:.4f} | {found.errors['raw']:+.4f} |" in table
    assert f" {found.errors['lawa']:+.4f} |" in table
    assert f"off the cooldown's loss by: lawa (the forecast) {abs(found.errors['lawa']):.3f} on average" in table
    assert (lawa_run / "report" / "report.png").stat().st_size > 10_000
    assert "forecast errors" in (lawa_run / "report" / "report.md").read_text()


def test_a_run_restarts_from_a_merge_with_fresh_or_its_checkpoints_moments(lawa_run, pydoc_data, tmp_path):
    """checkpoint.init_from names a merge's best folder; init_optimizer takes the AdamW moments of the
    parent's newest checkpoint at or before the merge's step (here 12)."""
    from core.zero_checkpoint import optim_states_file

    def exp_avg_sq(checkpoint: Path) -> torch.Tensor:
        outer = pickles.load(str(checkpoint / optim_states_file(0, 0)))["optimizer_state_dict"]
        torch_state = outer.get("optimizer_state_dict") or outer["base_optimizer_state"]  # ZeRO-3's key, or 1/2's
        inner = torch_state["state"]
        return torch.cat([inner[g]["exp_avg_sq"].flatten() for g in sorted(inner)])

    source = lawa_run / "merges" / "sqrt"
    runs = {}
    for keep in ("false", "true"):
        runs[keep] = tmp_path / f"keep_{keep}"
        proc = torchrun(2, *smoke(pydoc_data, runs[keep], f"checkpoint.init_from={source}",
                                  f"checkpoint.init_optimizer={keep}", "train.steps=1", "schedule.warmup_steps=1", "eval.every=0",
                                  "optimizer.lr=1e-12", "optimizer.weight_decay=0"))
    assert f"and optimizer state from {lawa_run / 'checkpoints' / step_name(12)}" in proc.stdout
    (best,) = slots.committed_steps(str(source))
    merged = consolidate(source, best)
    after = consolidate(runs["true"] / "checkpoints", 1)
    assert max((after[k] - merged[k]).abs().max().item() for k in merged) <= 1e-6
    # v' = beta2 * v + (1 - beta2) * g^2 >= beta2 * v (beta2 = 0.95) only when v is the parent's
    parent_v = exp_avg_sq(lawa_run / "checkpoints" / step_name(12))
    kept, fresh = (exp_avg_sq(runs[k] / "checkpoints" / step_name(1)) for k in ("true", "false"))
    assert bool((kept >= 0.95 * parent_v * (1 - 1e-6)).all())
    assert not bool((fresh >= 0.95 * parent_v * (1 - 1e-6)).all())


def test_sigkill_during_a_snapshot_write_leaves_only_valid_committed_slots(pydoc_data, tmp_path):
    run = tmp_path / "killed"
    snaps = run / "snaps"
    # A throttled write (320 KB per rank at 0.1 MB/s: ~3 s) gives a wide window to kill inside.
    args = smoke(pydoc_data, run, "snapshot.every=2", "snapshot.slots=4", "lawa.k=2", "train.steps=2000",
                 "checkpoint.every=5", "logging.every=50", "eval.every=0")
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py", *args,
                             "snapshot.max_write_mb_per_s=0.1"],
                            cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            )
    try:
        def mid_write():
            listed = slots.list_slots(str(snaps))
            if not any(committed for _, _, committed in listed):
                return None
            for step, path, committed in listed:
                if not committed and any(".partial-" in f for f in os.listdir(path)):
                    return step
            return None

        torn_step = wait_for(mid_write, 180, "a committed slot and a write in progress")
        kill_tree(proc.pid)
    finally:
        kill_tree(proc.pid)
    listed = slots.list_slots(str(snaps))
    assert (torn_step, str(snaps / step_name(torn_step)), False) in listed
    committed = [step for step, _, c in listed if c]
    assert committed and torn_step not in committed
    for step in committed:  # every committed slot is whole
        for dp_rank in (0, 1):
            slots.read_shard(str(snaps / step_name(step)), dp_rank, 0)

    # The sidecar, started by hand on the dead run, averages only committed slots.
    run_launcher([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "averaging.sidecar",
                  "--run-dir", str(run), "--once"])
    records = read_eval_log(str(run))
    assert len(records) == 1, records
    record = records[0]
    assert record["step"] == max(committed) and set(record["steps_averaged"]) <= set(committed)
    assert math.isfinite(record["lawa_val_loss"])

    # Resuming continues the ring buffer: the torn slot and any slot past the checkpoint are gone,
    # older committed slots stay and new ones follow.
    resume_step = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").iterdir()
                      if (p / "run_state.json").exists())
    torchrun(2, *args, f"train.stop_at={resume_step + 4}")
    after = slots.committed_steps(str(snaps))
    # the torn slot is gone, unless the resumed run legitimately wrote that step again
    assert (torn_step in after) == (resume_step < torn_step <= resume_step + 4)
    assert after[-1] == resume_step + 4 and all(s <= resume_step + 4 for s in after)
    assert [s for s in committed if s <= resume_step][-1:] == [s for s in after if s <= resume_step][-1:]


def test_a_crashed_sidecar_is_restarted_and_training_goes_on(pydoc_data, tmp_path):
    run = tmp_path / "crash"
    args = smoke(pydoc_data, run, *LAWA, "train.steps=150", "logging.every=5", "eval.every=0",
                 "checkpoint.every=1000", "sidecar.enabled=true")
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py", *args],
                            cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, )
    try:
        def sidecar_pids():
            out = subprocess.run(["pgrep", "-f", f"averaging.sidecar --run-dir {run}"], capture_output=True, text=True)
            return [int(p) for p in out.stdout.split()]

        def first_eval():
            return read_eval_log(str(run))

        wait_for(first_eval, 180, "the sidecar's first evaluation")
        os.kill(sidecar_pids()[0], signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, out[-3000:]
    assert "sidecar died" in out and "generation 1" in out
    assert "step 150/150" in out
    assert read_eval_log(str(run))[-1]["step"] == 150


def test_a_sidecar_dies_with_its_trainer(pydoc_data, tmp_path):
    """SIGKILL of the trainer processes (only them: not torchrun, not the sidecars) takes each one's
    sidecar with it: the sidecar asks the kernel for that itself as it starts (it once did so in a
    preexec_fn, which runs between fork and exec while the trainer has threads)."""
    import psutil

    run = tmp_path / "orphans"
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
                             *smoke(pydoc_data, run, *LAWA, "train.steps=5000", "logging.every=50", "eval.every=0",
                                    "checkpoint.every=100000", "sidecar.enabled=true")],
                            cwd=REPO, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def processes(what: str) -> list[psutil.Process]:
            found = []
            for p in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if what in " ".join(p.cmdline()):
                        found.append(p)
                except psutil.Error:  # a short-lived helper process, gone meanwhile
                    pass
            return found

        sidecars = wait_for(lambda: len(processes("averaging.sidecar")) == 2 and processes("averaging.sidecar"), 120,
                            "both sidecars")
        trainers = processes("launcher/train.py")
        assert len(trainers) == 2 and not {p.pid for p in trainers} & {p.pid for p in sidecars}
        for p in trainers:
            p.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(sidecars, timeout=20)
        assert not alive, alive
    finally:
        kill_tree(proc.pid)


@pytest.mark.parametrize("if_busy", ["skip", "wait"])
def test_skipped_and_waited_snapshots_are_counted_in_metrics(pydoc_data, tmp_path, if_busy):
    """Step 1's snapshot is a throttled write (320 KB per rank at 0.2 MB/s: 1.6 s, ten smoke steps, three
    on a loaded 2-core machine): step 2's snapshot is due while it runs, and is skipped, or
    waits for it; metrics.jsonl says so in step 2's window. (Step 3's, the last, waits in either mode.)"""
    run = tmp_path / if_busy
    torchrun(2, *smoke(pydoc_data, run, "snapshot.every=1", "snapshot.slots=3", "lawa.k=1", "train.steps=3",
                       "logging.every=1", "eval.every=0", "checkpoint.every=100", "snapshot.max_write_mb_per_s=0.2",
                       f"snapshot.if_busy={if_busy}"))
    windows = {r["step"]: r for r in read_metrics(run) if "snapshot_s" in r}
    assert sorted(windows) == [1, 2, 3]
    second = windows[2]
    if if_busy == "skip":
        assert (second["snapshots_skipped"], second["snapshot_wait_s"]) == (1, 0.0)
        assert slots.committed_steps(str(run / "snaps")) == [1, 3]
    else:
        assert second["snapshots_skipped"] == 0 and second["snapshot_wait_s"] > 0.5
        assert slots.committed_steps(str(run / "snaps")) == [1, 2, 3]
    assert windows[3]["snapshot_wait_s"] > 0.5  # the last snapshot waits for the one before it
    assert all(r["snapshot_s"] >= r["snapshot_wait_s"] for r in windows.values())
