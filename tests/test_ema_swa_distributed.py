"""EMA and SWA kept shard-local by 2 ZeRO-3 trainer ranks, checked against references computed from
the consolidated raw snapshots; resume keeps them; the sidecar scores them; the report draws them;
and a continual-pretraining run starts from another run's weights on another layout."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from averaging.ema_swa import ema_decay, ema_reference
from averaging.lawa import average_state_dicts
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, read_metrics, torchrun
from core.zero_folder import consolidate
from test_lawa_distributed import single_process_val_loss, smoke

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
    the final snapshot before the trainers leave."""
    run = tmp_path_factory.mktemp("averages") / "run"
    first = torchrun(2, *smoke(pydoc_data, run, *AVERAGES, "train.stop_at=6"))
    assert "stopped at step 6" in first.stdout
    second = torchrun(2, *smoke(pydoc_data, run, *AVERAGES, "sidecar.enabled=true"))
    assert "resumed from" in second.stdout and "holds no EMA/SWA state" not in second.stdout
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
                              "eval.every=0"))
    assert "initialised weights and optimizer state" in proc.stdout
    assert [r["lr"] for r in read_metrics(kept) if "lr" in r] == pytest.approx([1.5e-3, 3e-3])
    wrong = torchrun(1, *smoke(pydoc_data, tmp_path / "wrong", f"checkpoint.init_from={averaged_run / 'checkpoints'}",
                               "checkpoint.init_optimizer=true", "train.steps=2"), check=False)
    assert wrong.returncode != 0 and "only between equal layouts" in wrong.stderr
    assert "[rank0]: Traceback" not in wrong.stderr  # a one-line error from the worker (torchrun adds its own)
