"""bench/gpu_check.py --dry: the GPU session's script, run on CPU at tiny sizes so that it cannot rot
between GPU sessions; it reaches the launcher's bf16 path, every ZeRO stage and candidate speed-up
(torch.compile at each stage, ZeRO-3 buckets from the model, activation checkpointing, the batch
prefetcher), the plain-PyTorch reference, a deterministic stop-and-resume pair and the export's
scores; it checks that no stage or speed-up changes the losses, that each correctness part would
fail on the smallest effect this project measures (0.01 nats), and that the budget ends everything."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, launcher_env

sys.path.insert(0, str(REPO / "bench"))
from gpu_check import BF16_FLOOR_NATS, deterministic_error, export_check, resume_check  # noqa: E402

pytestmark = pytest.mark.distributed
SMALLEST_EFFECT_NATS = 0.01  # between two merges, or a merge and the raw weights (issue 26)


def gpu_check(out, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--out", str(out), *args], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["environment"]["dry"] is True
    c = res["correctness"]
    assert c["ok"] and not c["failures"], c["failures"]
    assert {"raw_val_loss", "lawa_val_loss", "ema_val_loss", "swa_val_loss"} <= set(c["sidecar_kinds"])
    # Deterministic stop-and-resume, and the export scored by our model and by transformers (fp32 on CPU).
    assert c["resume"]["max_abs_loss_diff"] <= 1e-5 and len(c["steps"]) == 12
    e = c["export"]
    assert e["fp32_rel_diff"] <= 1e-5 and e["sidecar_diff"] <= e["tolerance"] and e["transformers_bf16"] is None
    # Each part fails on an effect of the size this project measures, and says which part and by how much.
    best = c["best_record"]
    other = best["raw_val_loss"]  # the sidecar's score of another average at the same step
    assert abs(other - best["lawa_val_loss"]) > e["tolerance"]
    wrong = export_check(other, e["ours_fp32"], e["transformers_fp32"], None)["failures"]
    assert len(wrong) == 1 and wrong[0].startswith("export: the sidecar scored its best average"), wrong
    mapped = export_check(e["sidecar_loss"], e["ours_fp32"] + SMALLEST_EFFECT_NATS, e["transformers_fp32"], None)
    assert len(mapped["failures"]) == 1 and "(both fp32)" in mapped["failures"][0], mapped["failures"]

    (row,) = res["throughput"].values()
    variants = ("default", "compile", "zero2", "zero2_compile", "zero3_compile", "zero3", "zero3_buckets",
                "checkpointing")
    assert set(row) == {"reference", *variants, "best"}
    for what in ("reference", *variants):
        assert row[what]["tokens_per_s"] > 0 and row[what]["wall_s"] > 0, (what, row[what])
    for what in variants[1:]:  # every stage, compiled or not, computes the default's losses (ZeRO-1: auto on CPU)
        assert row[what]["max_rel_loss_diff_vs_default"] <= 1e-5, (what, row[what])
    assert row["best"] in variants
    # Compiled ZeRO-3 blocks run torch's linear: DeepSpeed's autograd Function loses gradients under
    # torch 2.11's compiler (the GPU image's; core/engine.py), while eager ZeRO-3 keeps its leaner one.
    assert row["zero3"]["linear"].startswith("deepspeed.") and not row["zero3_compile"]["linear"].startswith("deepspeed.")
    # On CPU the ratio means nothing (the GPU session holds it to its target); the arithmetic must hold.
    lc = res["lawa_cost"]
    assert lc["on"]["tokens_per_s"] > 0 and lc["off"]["tokens_per_s"] > 0 and lc["stall_per_snapshot_s"] > 0
    assert lc["ratio_on_off"] == pytest.approx(lc["on"]["tokens_per_s"] / lc["off"]["tokens_per_s"])
    assert lc["stall_share_at_every_200"] == pytest.approx(lc["stall_per_snapshot_s"] / (200 * lc["off"]["step_s"]))
    zs = res["zero_shot"]
    assert zs["choice"]["metrics_equal"] and zs["last_word"]["metrics_equal"] and zs["choice"]["after_s"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## 2. Throughput" in text and "| all | | | yes |" in text


def test_resume_and_bf16_checks_fail_on_the_smallest_effect_and_say_by_how_much():
    whole = {1: 10.9, 2: 10.5, 3: 9.8}
    assert resume_check(whole, dict(whole)) == {"max_abs_loss_diff": 0.0, "at_step": 1, "tolerance": 1e-5,
                                                "failure": None}
    off = resume_check(whole, {**whole, 2: 10.5 + SMALLEST_EFFECT_NATS})
    assert off["at_step"] == 2 and off["failure"].startswith("resume: at step 2 the resumed run's loss is 1.00e-02 nats")
    assert "one run only" in resume_check(whole, {1: 10.9, 2: 10.5})["failure"]
    # bf16: the tolerance is bf16's own effect on these batches (transformers bf16 against fp32), floored.
    ours = theirs_fp32 = 5.0
    within = export_check(5.0041, ours, theirs_fp32, 5.004)
    assert within["tolerance"] == pytest.approx(0.004) and not within["failures"]
    beyond = export_check(5.004 + SMALLEST_EFFECT_NATS, ours, theirs_fp32, 5.004)
    assert len(beyond["failures"]) == 1 and "in bf16 on the same batches: 1.00e-02 nats apart" in beyond["failures"][0]
    assert export_check(5.0, ours, theirs_fp32, 5.0)["tolerance"] == BF16_FLOOR_NATS < SMALLEST_EFFECT_NATS


def test_gpu_check_ends_within_its_budget_and_says_what_it_stopped(tmp_path):
    proc = gpu_check(tmp_path, "--parts", "throughput", "--budget-s", "6", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["total_s"] < 6 + 5 and set(res) == {"environment", "throughput", "throughput_s", "total_s"}
    (row,) = res["throughput"].values()
    cut = next(r for r in row.values() if isinstance(r, dict) and "skipped" in r)  # the first not measured
    assert cut["skipped"].startswith(("stopped at the time budget after", "out of the time budget")), cut
    assert all(row[v]["skipped"] == "out of the time budget" for v in ("compile", "zero3", "checkpointing"))
    text = (tmp_path / "gpu_check.md").read_text()
    assert "## 1. Correctness\n\nnot run (--parts)" in text and "skipped: out of the time budget" in text


def test_an_op_with_no_deterministic_algorithm_is_one_line_naming_the_key():
    import torch

    from launcher.trainer import deterministic_refusal

    torch.use_deterministic_algorithms(True)
    try:
        torch.zeros(4).put_(torch.tensor([0, 1]), torch.tensor([1.0, 2.0]))  # torch has no deterministic put_
    except RuntimeError as e:
        refused = e
    finally:
        torch.use_deterministic_algorithms(False)
    assert deterministic_refusal(refused) == ("train.deterministic: put_ does not have a deterministic "
                                              "implementation on this device; set train.deterministic=false")
    assert deterministic_refusal(RuntimeError("CUDA out of memory")) is None
    # What the GPU check makes of that run's failure: the run's own line, not its command line (which
    # names train.deterministic too).
    failed = RuntimeError("torchrun ... launcher/train.py train.deterministic=true exited 1:\n[rank0] ...\n"
                          f"config error: {deterministic_refusal(refused)}\nE1205 ... failed (exitcode: 2)")
    assert deterministic_error(failed) == f"config error: {deterministic_refusal(refused)}"
    assert deterministic_error(RuntimeError("torchrun ... train.deterministic=true exited 1:\nCUDA out of memory")) is None
