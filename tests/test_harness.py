"""lm-evaluation-harness over our weights: `python -m averaging.lm_eval` on the shipped tiny tasks
(multiple choice, last word, rolling perplexity, greedy generation) scores an exported model as the
harness's own Hugging Face backend does; tasks it cannot run are one line naming them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from models.hf import export
from models.registry import build_model, model_config

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


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    """A GPT-NeoX-shaped micro model whose every weight is random and large enough that its
    predictions are peaked (greedy answers and accuracies mean something), exported to HF."""
    root = tmp_path_factory.mktemp("harness")
    config = model_config("neox-micro", vocab_size=320, block_size=64)
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    export(model.state_dict(), config, str(root / "hf"), str(bpe_tokenizer(root / "tok")))
    return root / "hf"


def run(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, **OFFLINE, HF_HOME=str(tmp_path / "hf_home"))
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def ours(folder: Path, tasks: list[str], tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "ours.json"
    proc = run([sys.executable, "-m", "averaging.lm_eval", str(folder), "--tasks", *tasks, "--include_path",
                str(TASKS), "--output_path", str(out), *extra], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "|" in proc.stdout and all(Path(t).stem in proc.stdout for t in tasks)  # the harness's own table
    return json.loads(out.read_text())


def theirs(folder: Path, tasks: list[str], tmp_path: Path) -> dict:
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


def test_every_shipped_task_scores_as_the_harness_hugging_face_backend(hf_model, tmp_path):
    mine, reference = ours(hf_model, SHIPPED, tmp_path), theirs(hf_model, SHIPPED, tmp_path)
    assert_same_scores(mine, reference, SHIPPED)
    # Not a model that answers nothing or everything: the comparisons above can tell scorers apart.
    assert 0 < reference["results"]["tiny_choice"]["acc,none"] < 1
    assert reference["results"]["tiny_perplexity"]["word_perplexity,none"] > 1


def test_the_jsonl_formats_are_harness_tasks(hf_model, tmp_path):
    """eval.tasks' two formats, given as files, score as the shipped YAMLs over the same files."""
    mine = ours(hf_model, [str(TASKS / "choice.jsonl"), str(TASKS / "last_word.jsonl")], tmp_path)
    yamls = ours(hf_model, ["tiny_choice", "tiny_last_word"], tmp_path)
    for name, yaml_name in (("choice", "tiny_choice"), ("last_word", "tiny_last_word")):
        assert {k: v for k, v in mine["results"][name].items() if k not in ("alias", "name")} == \
               {k: v for k, v in yamls["results"][yaml_name].items() if k not in ("alias", "name")}


@pytest.mark.parametrize("tasks, message", [
    (["no_such_task"], "no_such_task: the harness has no task of this name or in"),
    (["lambada_openai"], "lambada_openai: cannot load its data (it needs a dataset from the internet"),
])
def test_a_task_it_cannot_run_is_one_line_naming_it(hf_model, tmp_path, tasks, message):
    proc = run([sys.executable, "-m", "averaging.lm_eval", str(hf_model), "--tasks", *tasks,
                "--include_path", str(TASKS)], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
