"""Scoring a model with lm-evaluation-harness both ways, for the tests that compare them: our backend
(`python -m averaging.lm_eval` on any folder a run writes) and the harness's own Hugging Face
backend (`lm_eval --model hf` on an exported folder), over the shipped tiny tasks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

TASKS = REPO / "tests" / "harness_tasks"
SHIPPED = ["tiny_choice", "tiny_last_word", "tiny_perplexity", "tiny_completion"]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
EXACT = ("acc", "acc_norm", "exact_match")  # counts of right answers: equal, not close


def bpe_tokenizer(folder: Path) -> Path:
    """A byte-level BPE of 300 tokens trained on the embedded corpus, with an end-of-text token."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder / "tokenizer.json"


def run(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **OFFLINE, HF_HOME=str(tmp_path / "hf_home"))
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def ours(folder: Path, tasks: list[str], tmp_path: Path, *extra: str) -> dict:
    """Our backend's results JSON for `tasks` on a run's folder (or an HF folder of ours)."""
    out = tmp_path / "ours.json"
    proc = run([sys.executable, "-m", "averaging.lm_eval", str(folder), "--tasks", *tasks, "--include_path",
                str(TASKS), "--output_path", str(out), *extra], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "|" in proc.stdout and all(Path(t).stem in proc.stdout for t in tasks)  # the harness's own table
    return json.loads(out.read_text())


def theirs(folder: Path, tasks: list[str], tmp_path: Path) -> dict:
    """lm_eval --model hf's results JSON on an HF folder, in fp32, one sequence at a time."""
    proc = run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                f"pretrained={folder},dtype=float32", "--tasks", ",".join(tasks), "--include_path", str(TASKS),
                "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "theirs")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result_file,) = (tmp_path / "theirs").rglob("results*.json")
    return json.loads(result_file.read_text())


def assert_same_scores(mine: dict, reference: dict, tasks: list[str]) -> None:
    for task in tasks:
        assert mine["n-samples"][task]["effective"] == reference["n-samples"][task]["effective"] > 0
        metrics = {k: v for k, v in reference["results"][task].items() if "," in k and "_stderr" not in k}
        assert metrics, task
        for key, value in metrics.items():
            if key.split(",")[0] in EXACT:
                assert mine["results"][task][key] == value, (task, key)
            else:
                assert mine["results"][task][key] == pytest.approx(value, rel=1e-5), (task, key)
