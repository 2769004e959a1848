"""EMA and SWA kept shard-local by 2 ZeRO-3 trainer ranks, checked against references computed from
the consolidated raw snapshots; resume keeps them; the sidecar scores them; the report draws them;
and a continual-pretraining run starts from another run's weights on another layout. The run trains
on an entropy-driven mixture of two sources plus one held out only, with W&B offline: per-source
held-out losses from the trainer and the sidecar (against a single process), TensorBoard's and the
report's per-source charts, and one W&B run across the resume."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from averaging.ema_swa import ema_decay, ema_reference
from averaging.lawa import average_state_dicts
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, lawa_train, read_metrics, torchrun
from core.zero_folder import consolidate
from launcher.metrics import sidecar_row
from run_checks import single_process_val_loss, single_process_val_losses, smoke
from wandb_files import history, offline_runs, step_metrics

pytestmark = pytest.mark.distributed

AVERAGES = ["snapshot.every=2", "snapshot.slots=8", "lawa.k=2", "lawa.spacing=2", "ema.enabled=true",
            "ema.half_life=3", "ema.every=2", "ema.start_step=2", "swa.enabled=true", "swa.start_step=6",
            "checkpoint.every=6", "logging.every=2", "eval.every=0", "train.steps=12"]


def slot(run: Path, step: int, kind: str = "") -> str:
    return str(run / "snaps" / f"step_{step:08d}" / kind)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def averaged_run(pydoc_data, tmp_path_factory) -> Path:
    """12 steps with a stop and resume at step 6; the resumed half runs the sidecar, which scores
    the final snapshot before the trainers leave. The launches' output is kept as launch{1,2}.out."""
    root = tmp_path_factory.mktemp("averages")
    rng = np.random.default_rng(0)
    (root / "digits.jsonl").write_text("".join(json.dumps(
        {"text": " ".join(f"{a} + {b} = {a + b}" for a, b in rng.integers(0, 999, (40, 2)))}) + "\n" for _ in range(60)))
    (root / "abab.txt").write_text("\n\n".join("ab " * 200 for _ in range(30)))
    sources = (f"data.sources=[{{path: 'builtin:pydoc'}}, {{path: {root / 'digits.jsonl'}, name: sums}}, "
               f"{{path: {root / 'abab.txt'}, weight: 0}}]")
    run = root / "run"
    # The pydoc data's tokenizer: the continual-pretraining test below loads these weights on that data.
    job = [*smoke(str(root / "data"), run, *AVERAGES), sources, "data.mixture=entropy", "parallel.zero_stage=3",
           f"data.tokenizer={pydoc_data}/tokenizer.json", "logging.wandb.mode=offline", "logging.wandb.project=tests",
           "lawa.forecast=lawa"]
    first = lawa_train(2, *job, "train.stop_at=6")  # the front command prepares the three sources first
    assert "stopped at step 6" in first.stdout
    second = torchrun(2, *job, "sidecar.enabled=true")
    assert "resumed from" in second.stdout and "holds no EMA/SWA state" not in second.stdout
    (run / "launch1.out").write_text(first.stdout)
    (run / "launch2.out").write_text(second.stdout)
    return run


def test_trainer_ema_and_swa_equal_references_over_the_raw_snapshots_across_a_resume(averaged_run):
    raw = {s: consolidate(slot(averaged_run, s)) for s in range(2, 13, 2)}
    ema = consolidate(slot(averaged_run, 12, "ema"))
    names = list(ema)
    reference = ema_reference([[raw[s][n] for n in names] for s in range(2, 13, 2)], ema_decay(3.0, 2))
    assert max_diff(ema, dict(zip(names, reference))) <= 1e-5
    swa = consolidate(slot(averaged_run, 12, "swa"))
    assert max_diff(swa, average_state_dicts([raw[s] for s in (6, 8, 10, 12)])) <= 1e-6
    manifest = json.loads(Path(slot(averaged_run, 12), "manifest.json").read_text())
    assert manifest["averages"]["ema"]["updates"] == 6 and manifest["averages"]["swa"]["count"] == 4
    # Before swa.start_step a slot carries the EMA only.
    assert json.loads(Path(slot(averaged_run, 4), "manifest.json").read_text())["averages"].keys() == {"ema"}


def test_sidecar_scores_ema_and_swa_like_a_single_process_would(averaged_run):
    final = read_eval_log(str(averaged_run))[-1]
    assert final["step"] == 12
    for kind in ("ema", "swa"):
        expected = single_process_val_loss(averaged_run, consolidate(slot(averaged_run, 12, kind)))
        assert final[f"{kind}_val_loss"] == pytest.approx(expected, rel=1e-5)
    assert final["raw_val_loss"] != final["ema_val_loss"] != final["swa_val_loss"]


def test_report_draws_a_finished_run(averaged_run, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([str(BIN / "python"), "-m", "launcher.report", str(averaged_run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "report.png").stat().st_size > 20_000
    table = (out / "report.md").read_text()
    final = read_eval_log(str(averaged_run))[-1]
    for label, key in (("raw", "raw"), ("LAWA", "lawa"), ("EMA", "ema"), ("SWA", "swa")):
        assert f"| {label} |" in table
        assert f"{final[f'{key}_val_loss']:.4f}" in table  # each method's final loss is in its row
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(BIN / "python"), "-m", "launcher.report", str(empty)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "has no" in proc.stderr and "Traceback" not in proc.stderr


def test_continual_run_starts_from_another_runs_weights_on_another_layout(averaged_run, tmp_path, pydoc_data):
    """1 rank takes the 2-rank run's final weights; with a negligible LR its first checkpoint is
    those weights; the schedule starts over (re-warmup)."""
    run = tmp_path / "continual"
    proc = torchrun(1, *smoke(pydoc_data, run, f"checkpoint.init_from={averaged_run / 'checkpoints'}",
                              "train.steps=1", "schedule.warmup_steps=1", "optimizer.lr=1e-12", "optimizer.weight_decay=0",
                              "eval.every=0", "checkpoint.every=1"))
    assert "initialised weights from" in proc.stdout
    source = consolidate(str(averaged_run / "checkpoints" / "step_00000012"))
    assert max_diff(consolidate(str(run / "checkpoints" / "step_00000001")), source) <= 1e-6
    # Our tensor-by-tensor reading of DeepSpeed's own files (padding uninitialised) is its zero_to_fp32, exactly.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    reference = get_fp32_state_dict_from_zero_checkpoint(str(averaged_run / "checkpoints"), tag="step_00000012")
    assert list(source) == list(reference) and all(torch.equal(source[k], reference[k]) for k in reference)
    # Keeping the optimizer state needs the same layout; the warmup restarts from step 0.
    kept = tmp_path / "kept"
    proc = torchrun(2, *smoke(pydoc_data, kept, f"checkpoint.init_from={averaged_run / 'checkpoints'}",
                              "checkpoint.init_optimizer=true", "train.steps=2", "schedule.warmup_steps=2",
                              "eval.every=0", "parallel.zero_stage=3"))
    assert "initialised weights and optimizer state" in proc.stdout
    assert [r["lr"] for r in read_metrics(kept) if "lr" in r] == pytest.approx([1.5e-3, 3e-3])
    wrong = torchrun(1, *smoke(pydoc_data, tmp_path / "wrong", f"checkpoint.init_from={averaged_run / 'checkpoints'}",
                               "checkpoint.init_optimizer=true", "train.steps=2"), check=False)
    assert wrong.returncode != 0 and "only between equal layouts" in wrong.stderr
    assert "[rank0]: Traceback" not in wrong.stderr  # a one-line error from the worker (torchrun adds its own)


def test_per_source_losses_from_the_trainer_and_the_sidecar_and_one_wandb_run(averaged_run, tmp_path):
    run = averaged_run
    manifest = json.loads((run.parent / "data" / "manifest.json").read_text())
    h = [s["conditional_entropy"] for s in manifest["sources"][:2]]
    share = math.exp(h[0]) / (math.exp(h[0]) + math.exp(h[1]))
    assert f"mixture (entropy): pydoc {share:.3f}, sums {1 - share:.3f}; held out only: abab" in (run / "launch1.out").read_text()

    mixture = next(r for r in read_metrics(run) if r.get("event") == "mixture")
    assert mixture["weights"] == pytest.approx({"pydoc": share, "sums": 1 - share, "abab": 0.0})
    trainer = {r["step"]: r for r in read_metrics(run) if "val_loss" in r}
    assert sorted(trainer) == [6, 12]
    for r in trainer.values():
        by = r["val_loss_by_source"]
        assert set(by) == {"pydoc", "sums", "abab"} and len(set(by.values())) == 3
        assert r["val_loss"] == pytest.approx(share * by["pydoc"] + (1 - share) * by["sums"], rel=1e-12)
    assert "(pydoc " in (run / "launch2.out").read_text() and ", abab " in (run / "launch2.out").read_text()  # the console line names each source
    evals = read_eval_log(str(run))

    final = read_eval_log(str(run))[-1]
    assert final["step"] == 12 and set(final["val_loss_by_source"]) == {"raw", "lawa", "ema", "swa"}
    # raw in the sidecar = the trainer's weights at that step, on the same windows
    for source, loss in trainer[12]["val_loss_by_source"].items():
        assert final["val_loss_by_source"]["raw"][source] == pytest.approx(loss, rel=1e-6)
    # LAWA per source = the consolidated average scored by one process
    average = average_state_dicts([consolidate(slot(run, s)) for s in final["steps_averaged"]])
    overall, by_source = single_process_val_losses(run, average)
    assert final["lawa_val_loss"] == pytest.approx(overall, rel=1e-5)
    assert final["val_loss_by_source"]["lawa"] == pytest.approx(by_source, rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run / "tensorboard").rglob("events.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"val_loss_by_source/abab/trainer", "val_loss_by_source/sums/lawa", "val_loss_by_source/pydoc/ema",
            "val_loss/forecast"} <= tags
    sidecar_tags = set()
    for events in (run / "tensorboard" / "sidecar").rglob("events.*"):
        sidecar_tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {f"sidecar/{tag}" for tag in sidecar_tags} == set(sidecar_row(final)) - {"step", "tokens"}  # W&B charts what TensorBoard does

    # W&B, offline: both launches in one run (the id kept in the run dir), every row on the training
    # step axis, the sidecar's rows (read by the trainer after later steps) at their own step.
    runs = offline_runs(run)
    run_id = (run / "wandb_id").read_text().strip()
    assert len(runs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in runs)
    assert step_metrics(runs[0])["*"] == "step"
    rows = [row for p in runs for row in history(p)]
    train = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(train) == [2, 4, 6, 8, 10, 12] and train[12]["loss"] == next(
        r["loss"] for r in read_metrics(run) if r.get("step") == 12 and "loss" in r)
    vals = {r["step"]: r for r in rows if "val_loss" in r}
    assert vals[12]["val_loss_by_source/sums"] == trainer[12]["val_loss_by_source"]["sums"]
    sidecar = {r["step"]: r for r in rows if "sidecar/val_loss/raw" in r}
    assert set(sidecar) == {r["step"] for r in evals} and sidecar[12]["tokens"] == 12 * 512
    assert sidecar[12]["sidecar/val_loss/lawa"] == final["lawa_val_loss"]
    assert sidecar[12]["sidecar/val_loss_minus_raw/ema"] == final["ema_val_loss"] - final["raw_val_loss"]
    assert final["forecast"] == "lawa" and sidecar[12]["sidecar/val_loss/forecast"] == final["lawa_val_loss"]
    assert sidecar[12]["sidecar/val_loss_by_source/abab/swa"] == final["val_loss_by_source"]["swa"]["abab"]
    for p in runs:  # W&B's own row counter only grows; our `step` axis is what places each row
        counters = [r["_step"] for r in history(p)]
        assert counters == sorted(counters)

    out = tmp_path / "report"
    report = subprocess.run([str(BIN / "python"), "-m", "launcher.report", str(run), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (out / "sources.png").stat().st_size > 20_000
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| run | LAWA |"))
    assert f"{final['val_loss_by_source']['lawa']['sums']:.4f}" in row
