"""Gstack end to end: a 2-layer ZeRO-3 run grown into deeper runs of other layouts, which train with
the sidecar on and export to Hugging Face."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from averaging.sidecar.protocol import read_eval_log
from conftest import REPO, read_metrics, torchrun
from core.zero_folder import consolidate
from run_checks import hf_val_loss, smoke

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def small_run(pydoc_data, tmp_path_factory) -> Path:
    """The micro model (2 blocks), checkpoints at steps 3 and 6 (512 tokens per step), at ZeRO-2:
    the grown runs read DeepSpeed's own ZeRO-2 checkpoints into ZeRO-3 and ZeRO-1 engines."""
    run = tmp_path_factory.mktemp("gstack") / "small"
    torchrun(2, *smoke(pydoc_data, run, "train.steps=6", "checkpoint.every=3", "eval.every=0", "parallel.zero_stage=2"))
    return run


def test_grown_run_starts_from_the_stacked_blocks_in_its_own_layout(small_run, pydoc_data, tmp_path):
    run = tmp_path / "grown"
    proc = torchrun(2, *smoke(pydoc_data, run, "model.n_layer=6", f"growth.from_run={small_run}", "growth.factor=3",
                              "growth.at_tokens=2000", "parallel.tensor=2", "train.steps=1", "schedule.warmup_steps=1",
                              "optimizer.lr=1e-12", "optimizer.weight_decay=0", "checkpoint.every=1", "eval.every=0",
                              "parallel.zero_stage=3"))
    assert "world 2 = tensor 2 × data 1" in proc.stdout
    assert "initialised by growing" in proc.stdout and "step_00000003 (2 -> 6 layers, stack)" in proc.stdout
    small = consolidate(str(small_run / "checkpoints" / "step_00000003"))
    grown = consolidate(str(run / "checkpoints" / "step_00000001"))
    assert sum(name.startswith("blocks.5.") for name in grown) > 0 and not any(n.startswith("blocks.6.") for n in grown)
    for name, tensor in grown.items():
        parts = name.split(".")
        source = f"blocks.{int(parts[1]) % 2}." + ".".join(parts[2:]) if parts[0] == "blocks" else name
        assert (tensor - small[source]).abs().max().item() <= 1e-6, name


def test_grown_model_trains_with_the_sidecar_on_and_exports_to_hugging_face(small_run, pydoc_data, tmp_path):
    run = tmp_path / "grown"
    proc = torchrun(2, *smoke(pydoc_data, run, "model.n_layer=4", f"growth.from_run={small_run}", "growth.factor=2",
                              "snapshot.every=2", "snapshot.slots=6", "lawa.k=2", "lawa.spacing=2", "train.steps=8",
                              "eval.every=0", "sidecar.enabled=true", "sidecar.export_hf=true"))
    assert "initialised by growing" in proc.stdout and "step_00000006 (2 -> 4 layers" in proc.stdout
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    (event,) = [r for r in read_metrics(run) if r.get("event") == "growth"]
    assert event["source_tokens"] == 6 * 512 and event["source_layers"] == 2
    report = subprocess.run([sys.executable, "-m", "launcher.report", str(run), "--out", str(tmp_path / "report")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "(+ 3.07k in the run it was grown from)" in report.stdout, report.stderr
    best = [r for r in read_eval_log(str(run)) if r["best"]][-1]
    assert hf_val_loss(run, run / "lawa_best_hf") == pytest.approx(best["lawa_val_loss"], rel=1e-4)
    wrong = torchrun(2, *smoke(pydoc_data, tmp_path / "wrong", "model.n_layer=5", f"growth.from_run={small_run}",
                               "growth.factor=2", "train.steps=2"), check=False)
    assert wrong.returncode != 0 and "growth: 2 × the source's 2 layers gives n_layer=4" in wrong.stderr
