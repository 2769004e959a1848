"""Per-source held-out losses in a real run: 2 ZeRO-3 trainer ranks on an entropy-driven mixture of
two sources plus one held out only, the sidecar online; the trainer's and the sidecar's per-source
scores, TensorBoard's charts, the report's panel, and the sidecar's against a single process."""
from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest

from averaging.lawa import average_state_dicts
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, read_metrics, torchrun
from core.zero_folder import consolidate
from test_lawa_distributed import single_process_val_losses, smoke

pytestmark = pytest.mark.distributed


def test_per_source_losses_from_the_trainer_and_the_sidecar_on_an_entropy_mixture(pydoc_data, tmp_path):
    rng = np.random.default_rng(0)
    digits = tmp_path / "digits.jsonl"
    digits.write_text("".join(json.dumps({"text": " ".join(f"{a} + {b} = {a + b}" for a, b in rng.integers(0, 999, (40, 2)))})
                              + "\n" for _ in range(60)))
    abab = tmp_path / "abab.txt"
    abab.write_text("\n\n".join("ab " * 200 for _ in range(30)))
    sources = (f"data.sources=[{{path: 'builtin:pydoc'}}, {{path: {digits}, name: sums}}, "
               f"{{path: {abab}, weight: 0}}]")
    run = tmp_path / "run"
    proc = torchrun(2, *smoke(str(tmp_path / "data"), run, sources, "data.mixture=entropy",
                              f"data.tokenizer={pydoc_data}/tokenizer.model", "train.steps=8", "eval.every=4",
                              "snapshot.every=2", "lawa.k=3", "lawa.spacing=2", "ema.enabled=true",
                              "sidecar.enabled=true", "logging.every=4", "checkpoint.every=8"))
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    h = [s["conditional_entropy"] for s in manifest["sources"][:2]]
    share = math.exp(h[0]) / (math.exp(h[0]) + math.exp(h[1]))
    assert f"mixture (entropy): pydoc {share:.3f}, sums {1 - share:.3f}; held out only: abab" in proc.stdout

    mixture = next(r for r in read_metrics(run) if r.get("event") == "mixture")
    assert mixture["weights"] == pytest.approx({"pydoc": share, "sums": 1 - share, "abab": 0.0})
    trainer = {r["step"]: r for r in read_metrics(run) if "val_loss" in r}
    assert sorted(trainer) == [4, 8]
    for r in trainer.values():
        by = r["val_loss_by_source"]
        assert set(by) == {"pydoc", "sums", "abab"} and len(set(by.values())) == 3
        assert r["val_loss"] == pytest.approx(share * by["pydoc"] + (1 - share) * by["sums"], rel=1e-12)
    assert "(pydoc " in proc.stdout and ", abab " in proc.stdout  # the console line names each source

    final = read_eval_log(str(run))[-1]
    assert final["step"] == 8 and set(final["val_loss_by_source"]) == {"raw", "lawa", "ema"}
    # raw in the sidecar = the trainer's weights at that step, on the same windows
    for source, loss in trainer[8]["val_loss_by_source"].items():
        assert final["val_loss_by_source"]["raw"][source] == pytest.approx(loss, rel=1e-6)
    # LAWA per source = the consolidated average scored by one process
    average = average_state_dicts([consolidate(str(run / "snaps" / f"step_{s:08d}")) for s in final["steps_averaged"]])
    overall, by_source = single_process_val_losses(run, average)
    assert final["lawa_val_loss"] == pytest.approx(overall, rel=1e-5)
    assert final["val_loss_by_source"]["lawa"] == pytest.approx(by_source, rel=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run / "tensorboard").rglob("events.*"):
        tags |= set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    assert {"val_loss_by_source/abab/trainer", "val_loss_by_source/sums/lawa", "val_loss_by_source/pydoc/ema"} <= tags

    out = tmp_path / "report"
    report = subprocess.run([str(BIN / "python"), "-m", "launcher.report", str(run), "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (out / "sources.png").stat().st_size > 20_000
    row = next(line for line in (out / "report.md").read_text().splitlines() if line.startswith("| run | LAWA |"))
    assert f"{final['val_loss_by_source']['lawa']['sums']:.4f}" in row
