"""A GPT-NeoX run on 2 ZeRO-3 ranks whose best LAWA average the sidecar exports to Hugging Face;
transformers scores it as our sidecar did; the export CLI and continual pretraining from an HF folder."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from averaging import slots
from averaging.harness import flat_results
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, read_metrics, torchrun
from core.zero_folder import consolidate
from models.hf import read_folder
from run_checks import hf_val_loss, smoke

pytestmark = pytest.mark.distributed

HARNESS_DIR = REPO / "tests" / "harness_tasks"
HARNESS_TASKS = ["tiny_perplexity", "tiny_completion"]
NEOX = ["model.size=neox-micro", "snapshot.every=4", "snapshot.slots=6", "lawa.k=2", "lawa.spacing=4",
        "train.steps=12", "eval.every=0", "sidecar.enabled=true", "sidecar.export_hf=true"]


def write_tasks(folder: Path) -> list[Path]:
    """A last-word and a multiple-choice task made from the embedded corpus (7 and 5 examples: the
    two data-parallel ranks get unequal shares)."""
    from pydoc_data.topics import topics

    texts = [" ".join(t.split()[:16]) for t in list(topics.values())[:40] if len(t.split()) >= 16]
    last_word = [{"text": t} for t in texts[:7]]
    choice = [{"context": " ".join(t.split()[:10]), "choices": [" " + " ".join(t.split()[10:]),
                                                               " " + " ".join(o.split()[10:])], "answer": 0}
              for t, o in zip(texts[7:12], texts[12:17])]
    paths = [folder / "last_word.jsonl", folder / "choice.jsonl"]
    for path, records in zip(paths, (last_word, choice)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


@pytest.fixture(scope="module")
def neox_run(pydoc_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("neox") / "run"
    tasks = write_tasks(run.parent)
    proc = torchrun(2, *smoke(pydoc_data, run, *NEOX, f"eval.tasks=[{tasks[0]}, {tasks[1]}]", "parallel.zero_stage=2",
                              f"eval.harness_tasks=[{', '.join(HARNESS_TASKS)}]", f"eval.harness_include={HARNESS_DIR}",
                              "eval.task_every=12"))
    assert "raw vs the merges, validation loss" in proc.stdout
    return run


def test_sidecar_task_scores_equal_the_offline_command_on_the_same_slot(neox_run, tmp_path):
    """lm-evaluation-harness online: the jsonl formats and the harness's own YAML tasks (rolling
    perplexity, greedy generation), scored by the two sidecar ranks on raw and the merge at the
    steps eval.task_every names, equal `python -m averaging.lm_eval` in one process on that slot."""
    records = {r["step"]: r for r in read_eval_log(str(neox_run))}
    assert all("tasks" not in r for step, r in records.items() if step != 12)  # task_every=12
    online = records[12]["tasks"]
    assert set(online) >= {"raw", "lawa"} and online["raw"]["last_word"]["n"] == 7
    assert set(online["raw"]) == {"last_word", "choice", *HARNESS_TASKS}
    out = tmp_path / "offline.json"
    proc = subprocess.run([str(BIN / "python"), "-m", "averaging.lm_eval", str(neox_run / "snaps" / "step_00000012"),
                           "--tasks", str(neox_run.parent / "last_word.jsonl"), str(neox_run.parent / "choice.jsonl"),
                           *HARNESS_TASKS, "--include_path", str(HARNESS_DIR), "--output_path", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = flat_results(json.loads(out.read_text()))
    assert set(offline) == set(online["raw"])
    for task, metrics in offline.items():
        assert set(metrics) == set(online["raw"][task]), task
        for key, value in metrics.items():
            assert online["raw"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
    report = (neox_run / "report" / "report.md").read_text()  # written at the end of the run
    row = next(line for line in report.splitlines() if "| tiny_perplexity | bits_per_byte |" in line)
    assert row.startswith("| 12 |") and f"{online['raw']['tiny_perplexity']['bits_per_byte']:.4f}" in row


def test_sidecar_exports_its_best_average_and_transformers_scores_it_the_same(neox_run):
    best = [r for r in read_eval_log(str(neox_run)) if r["best"]][-1]
    (step,) = slots.committed_steps(str(neox_run / "lawa_best"))
    assert step == best["step"]
    assert hf_val_loss(neox_run, neox_run / "lawa_best_hf") == pytest.approx(best["lawa_val_loss"], rel=1e-4)


def test_export_cli_turns_a_checkpoint_into_a_model_transformers_loads(neox_run, tmp_path):
    out = tmp_path / "hf"
    proc = subprocess.run([str(BIN / "python"), "-m", "models.hf", "export",
                           str(neox_run / "checkpoints" / "step_00000012"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    final_val = [r["val_loss"] for r in read_metrics(neox_run) if "val_loss" in r][-1]
    assert hf_val_loss(neox_run, out) == pytest.approx(final_val, rel=1e-4)
    bad = subprocess.run([str(BIN / "python"), "-m", "models.hf", "export", str(tmp_path), "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "pass --run-dir" in bad.stderr and "Traceback" not in bad.stderr


def test_continual_pretraining_starts_from_a_hugging_face_folder(neox_run, pydoc_data, tmp_path):
    run = tmp_path / "from_hf"
    proc = torchrun(1, *smoke(pydoc_data, run, "model.size=neox-micro", f"checkpoint.init_from={neox_run / 'lawa_best_hf'}",
                              "train.steps=1", "schedule.warmup_steps=1", "optimizer.lr=1e-12",
                              "optimizer.weight_decay=0", "eval.every=0", "checkpoint.every=1"))
    assert "initialised weights from" in proc.stdout
    expected, _ = read_folder(str(neox_run / "lawa_best_hf"))
    got = consolidate(str(run / "checkpoints" / "step_00000001"))
    assert set(got) == set(expected)
    assert max((got[k] - expected[k]).abs().max().item() for k in got) <= 1e-6
