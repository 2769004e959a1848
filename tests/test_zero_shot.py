"""The zero-shot scorer on hand-made tasks whose answers a small trained model is certain of, and
its batching checked against a one-sequence-per-forward reference on tasks of varied lengths."""
import json
import string

import pytest
import torch

from averaging.zero_shot import (
    Request,
    Task,
    continuation_ids,
    evaluate_task,
    full_logits,
    load_task,
    plan_batches,
    score_shard,
    summarize,
)
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
        return summarize(task, evaluate_task(task, full_logits(model), tok.encode, 16, torch.device("cpu")))


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
        whole = evaluate_task(task, full_logits(model), tok.encode, 16, torch.device("cpu"))
        parts = [evaluate_task(task, full_logits(model), tok.encode, 16, torch.device("cpu"), (r, 2)) for r in (0, 1)]
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


# ---------------------------------------------------------------------------------------------
# batching against the reference

ALPHABET = string.ascii_lowercase + " .,"
BLOCK = 24


def encode_chars(text: str) -> list[int]:
    """One id per character: continuations of several tokens, and contexts of any length."""
    return [ALPHABET.index(c) for c in text]


def reference_scores(model, task, block_size):
    """The scorer as it was before batching: one (context, continuation) per forward, the whole
    (1, T, V) log-softmaxed."""
    scores = {}
    for i, request in enumerate(task.requests):
        for j, continuation in enumerate(request.continuations):
            ctx, cont = continuation_ids(encode_chars, request.context, continuation)
            ids = (ctx + cont)[-(block_size + 1):]
            cont = cont[-min(len(cont), len(ids) - 1):] if len(ids) > 1 else []
            if not cont:
                scores[i, j] = (0.0, True, 0)
                continue
            lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)[0, -len(cont):]
            target = torch.tensor(cont)
            scores[i, j] = (lp.gather(-1, target.unsqueeze(-1)).sum().item(),
                            bool((lp.argmax(-1) == target).all()), len(cont))
    return scores


def reference_sums(task, scores):
    sums = {"n": 0.0, "correct": 0.0, "correct_norm": 0.0, "logprob": 0.0, "tokens": 0.0}
    for i, request in enumerate(task.requests):
        scored = [scores[i, j] for j in range(len(request.continuations))]
        sums["n"] += 1
        if task.kind == "last_word":
            sums["correct"] += scored[0][1]
            sums["logprob"] += scored[0][0]
            sums["tokens"] += scored[0][2]
        else:
            best = max(range(len(scored)), key=lambda k: scored[k][0])
            best_norm = max(range(len(scored)), key=lambda k: scored[k][0] / len(request.continuations[k]))
            sums["correct"] += best == request.answer
            sums["correct_norm"] += best_norm == request.answer
    return sums


def assert_same_scores(got, want):
    assert list(got) == list(want)  # the task's order, every continuation
    for key in want:
        assert got[key][1:] == want[key][1:], key  # greedy, token count
        assert got[key][0] == pytest.approx(want[key][0], rel=1e-5, abs=1e-5), key


@pytest.fixture(scope="module")
def random_model():
    """A micro GPT with weights large enough that its predictions are peaked and position-dependent."""
    torch.manual_seed(1)
    model = build_model(model_config("micro", vocab_size=len(ALPHABET), block_size=BLOCK)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def greedy_text(model, context: str, n: int) -> str:
    ids = encode_chars(context)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-BLOCK:]]))[0][0, -1].argmax()))
    return "".join(ALPHABET[i] for i in ids[-n:])


def prose(n: int) -> list[str]:
    from pydoc_data.topics import topics

    words = " ".join(topics.values()).lower().split()
    words = ["".join(c for c in w if c in ALPHABET) for w in words]
    return [w for w in words if w][:n]


@pytest.fixture(scope="module")
def varied(random_model):
    """Requests of 0 to 40 context characters (the block is 24) and continuations of 1 to 30 (so
    some are longer than the block), some the model's own greedy ones."""
    words = prose(400)
    requests = []
    for i in range(30):
        context = " ".join(words[i * 7: i * 7 + i % 9])[: (i * 11) % 41]
        length = [1, 2, 5, 9, 30][i % 5]
        choices = [" ".join(words[200 + i + k: 210 + i + k])[:length + k] for k in range(1 + i % 4)]
        if i % 3 == 0:
            choices[0] = greedy_text(random_model, context or "a", length)
            context = context or "a"
        requests.append(Request(context, choices, i % len(choices)))
    # No context: the first token has no prediction; a one-token choice has nothing to score.
    requests.append(Request("", [" the end", "x", " an"], 2))
    return Task("varied", "choice", requests)


def test_batched_scores_equal_one_sequence_per_forward(random_model, varied):
    want = reference_scores(random_model, varied, BLOCK)
    assert any(greedy for _, greedy, _ in want.values())  # the greedy flag is tested, not all False
    assert len({count for _, _, count in want.values()}) > 5
    assert max(len(r.context) + max(map(len, r.continuations)) for r in varied.requests) > 2 * BLOCK
    sequences = sum(count > 0 for _, _, count in want.values())  # one has nothing to score
    for batch_tokens, forwards in [(1, sequences), (96, None), (10 ** 6, 1)]:
        calls = []
        with torch.no_grad():
            got = score_shard(varied, counting(random_model, calls), encode_chars, BLOCK, torch.device("cpu"),
                              batch_tokens=batch_tokens)
        assert_same_scores(got, want)
        if forwards is not None:
            assert len(calls) == forwards
        # Batches are padded to their longest sequence and hold at most batch_tokens padded tokens.
        assert all(x.numel() <= max(batch_tokens, x.shape[1]) for x in calls)


def test_metrics_equal_the_reference_whatever_the_batch(random_model, varied, tmp_path):
    records = [{"context": r.context, "choices": r.continuations, "answer": r.answer} for r in varied.requests]
    choice = load_task(write(tmp_path, "choice", records))
    last_word = load_task(write(tmp_path, "lw", [{"text": f"{r.context} {r.continuations[0]}".strip()}
                                                 for r in varied.requests if " " in f"{r.context} {r.continuations[0]}".strip()]))
    for task in (choice, last_word):
        want = reference_sums(task, reference_scores(random_model, task, BLOCK))
        for batch_tokens in (1, 50, 10 ** 6):
            with torch.no_grad():
                got = evaluate_task(task, full_logits(random_model), encode_chars, BLOCK, torch.device("cpu"),
                                    batch_tokens=batch_tokens)
            assert {k: v for k, v in got.items() if k != "logprob"} == {k: v for k, v in want.items() if k != "logprob"}
            assert got["logprob"] == pytest.approx(want["logprob"], rel=1e-5)


def counting(model, calls):
    def run(x, keep):
        calls.append(x.clone())
        return model(x, keep=keep)[0]
    return run


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_shard_makes_the_same_number_of_forward_calls(random_model, varied, n):
    """As a collective forward needs; the shards' work is uneven (varied lengths and choice counts)."""
    batch_tokens = 60
    plans = [plan_batches(varied, encode_chars, BLOCK, (r, n), batch_tokens) for r in range(n)]
    assert len({len(p) for p in plans}) > 1
    parts, calls = [], []
    with torch.no_grad():
        for r in range(n):
            calls.append([])
            parts.append(score_shard(varied, counting(random_model, calls[-1]), encode_chars, BLOCK,
                                     torch.device("cpu"), (r, n), batch_tokens))
            # Another tensor-parallel rank of the same shard sends the model the very same inputs.
            again = []
            score_shard(varied, counting(random_model, again), encode_chars, BLOCK, torch.device("cpu"),
                        (r, n), batch_tokens)
            assert len(again) == len(calls[-1]) and all(torch.equal(a, b) for a, b in zip(again, calls[-1]))
    assert [len(c) for c in calls] == [max(map(len, plans))] * n
    whole = {k: v for part in parts for k, v in part.items()}
    assert_same_scores(dict(sorted(whole.items())), reference_scores(random_model, varied, BLOCK))
