"""lm-evaluation-harness over our weights: `python -m averaging.lm_eval` on the shipped tiny tasks
(multiple choice, last word, rolling perplexity, greedy generation) scores an exported model as the
harness's own Hugging Face backend does; tasks it cannot run are one line naming them."""
import sys
from pathlib import Path

import pytest
import torch

from harness_checks import SHIPPED, TASKS, assert_same_scores, bpe_tokenizer, ours, run, theirs
from models.hf import export
from models.registry import build_model, model_config


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
