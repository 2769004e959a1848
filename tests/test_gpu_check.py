"""bench/gpu_check.py --dry: the GPU session's script, run on CPU at tiny sizes so that it cannot rot
between GPU sessions; it reaches the launcher's bf16 path, every ZeRO stage and candidate speed-up
(torch.compile at each stage, ZeRO-3 buckets from the model, activation checkpointing, the batch
prefetcher) and the plain-PyTorch reference, and checks that no stage or speed-up changes the losses."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, launcher_env

pytestmark = pytest.mark.distributed


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--out", str(tmp_path)], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["environment"]["dry"] is True
    c = res["correctness"]
    assert c["ok"] and c["resumed_max_rel_loss_diff"] is None and c["hf_rel_diff"] <= 1e-4  # resume: not in --dry
    assert {"raw_val_loss", "lawa_val_loss", "ema_val_loss", "swa_val_loss"} <= set(c["sidecar_kinds"])
    (row,) = res["throughput"].values()
    variants = ("default", "compile", "zero3", "zero3_compile", "zero2", "zero3_buckets", "checkpointing")
    for what in ("reference", *variants):
        assert row[what]["tokens_per_s"] > 0, (what, row[what])
    for what in variants[1:]:  # every stage, compiled or not, computes the default's losses (ZeRO-1: auto on CPU)
        assert row[what]["max_rel_loss_diff_vs_default"] <= 1e-5, (what, row[what])
    assert row["best"] in variants
    # On CPU the ratio means nothing (the GPU session holds it to its target); the arithmetic must hold.
    lc = res["lawa_cost"]
    assert lc["on"]["tokens_per_s"] > 0 and lc["off"]["tokens_per_s"] > 0 and lc["stall_per_snapshot_s"] > 0
    assert lc["ratio_on_off"] == pytest.approx(lc["on"]["tokens_per_s"] / lc["off"]["tokens_per_s"])
    assert lc["stall_share_at_every_200"] == pytest.approx(lc["stall_per_snapshot_s"] / (200 * lc["off"]["step_s"]))
    zs = res["zero_shot"]
    assert zs["choice"]["metrics_equal"] and zs["last_word"]["metrics_equal"] and zs["choice"]["after_s"] > 0
    assert "## 2. Throughput" in (tmp_path / "gpu_check.md").read_text()
