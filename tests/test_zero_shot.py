"""The zero-shot scorer on hand-made tasks whose answers a small trained model is certain of."""
import json

import pytest
import torch

from averaging.zero_shot import evaluate_task, full_log_probs, load_task, summarize
from models.registry import build_model, model_config

SENTENCE = "the cat sat on the mat and the dog sat on the rug ."


class WordTokenizer:
    """One id per space-separated word: exact, so the test knows every token boundary."""

    def __init__(self, text: str):
        self.ids = {w: i for i, w in enumerate(sorted(set(text.split())))}

    def encode(self, text: str) -> list[int]:
        return [self.ids[w] for w in text.split()]


@pytest.fixture(scope="module")
def trained():
    """A micro GPT that has memorised SENTENCE (seconds on a CPU)."""
    tok = WordTokenizer(SENTENCE)
    ids = torch.tensor(tok.encode(SENTENCE))
    torch.manual_seed(0)
    model = build_model(model_config("micro", vocab_size=16, block_size=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), tok


def write(tmp_path, name, records):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(model, tok, path):
    task = load_task(path)
    with torch.no_grad():
        return summarize(task, evaluate_task(task, full_log_probs(model), tok.encode, 16, torch.device("cpu")))


def test_multiple_choice_picks_the_memorised_continuation(trained, tmp_path):
    model, tok = trained
    right = [{"context": "the cat sat on the", "choices": [" rug", " mat", " dog"], "answer": 1},
             {"context": "and the dog sat on the", "choices": [" rug", " mat"], "answer": 0}]
    assert run(model, tok, write(tmp_path, "right", right)) == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    wrong = [dict(r, answer=(r["answer"] + 1) % len(r["choices"])) for r in right]
    assert run(model, tok, write(tmp_path, "wrong", wrong))["acc"] == 0.0


def test_last_word_accuracy_and_perplexity(trained, tmp_path):
    model, tok = trained
    result = run(model, tok, write(tmp_path, "lw", [{"text": "the cat sat on the mat"},
                                                    {"text": "the cat sat on the mat and the dog"}]))
    assert result["acc"] == 1.0 and result["n"] == 2 and 1.0 <= result["ppl"] < 1.1
    assert run(model, tok, write(tmp_path, "lw_bad", [{"text": "the cat sat on the rug"}]))["acc"] == 0.0


def test_sharded_sums_add_up_to_the_whole(trained, tmp_path):
    model, tok = trained
    records = [{"context": "the cat sat on the", "choices": [" rug", " mat"], "answer": i % 2} for i in range(5)]
    task = load_task(write(tmp_path, "s", records))
    with torch.no_grad():
        whole = evaluate_task(task, full_log_probs(model), tok.encode, 16, torch.device("cpu"))
        parts = [evaluate_task(task, full_log_probs(model), tok.encode, 16, torch.device("cpu"), (r, 2)) for r in (0, 1)]
    assert {k: parts[0][k] + parts[1][k] for k in whole} == whole


@pytest.mark.parametrize("lines, message", [
    (['{"text": "a b"}', '{"context": "a", "choices": ["b"], "answer": 0}'], ":2: expected"),
    (['{"context": "a", "choices": ["b", "c"], "answer": 2}'], ":1: answer must index choices"),
    (['{"text": "single"}'], ":1: the text needs a context"),
    (["not json"], ":1: not JSON"),
])
def test_malformed_task_files_name_the_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        load_task(str(path))
