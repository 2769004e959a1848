"""The batched scoring engine under the harness backend (averaging/scoring.py), checked against
one sequence per forward with the whole (1, T, V) log-softmaxed, on sequences of varied lengths
(some longer than the block), and its shards' forward counts (a collective forward needs them
equal)."""
import string

import pytest
import torch

from averaging.scoring import plan_batches, score_shard, to_sequence
from models.registry import build_model, model_config

ALPHABET = string.ascii_lowercase + " .,"
BLOCK = 24


def encode_chars(text: str) -> list[int]:
    """One id per character: continuations of several tokens, and contexts of any length."""
    return [ALPHABET.index(c) for c in text]


def reference_scores(model, pairs, block_size):
    """The scorer as it was before batching: one (context, continuation) per forward, the whole
    (1, T, V) log-softmaxed."""
    scores = {}
    for i, (ctx, cont) in enumerate(pairs):
        ids = (ctx + cont)[-(block_size + 1):]
        cont = cont[-min(len(cont), len(ids) - 1):] if len(ids) > 1 else []
        if not cont:
            scores[i] = (0.0, True, 0)
            continue
        lp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)[0, -len(cont):]
        target = torch.tensor(cont)
        scores[i] = (lp.gather(-1, target.unsqueeze(-1)).sum().item(), bool((lp.argmax(-1) == target).all()), len(cont))
    return scores


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
    """(context, continuation) token lists of 0 to 40 context characters (the block is 24) and
    continuations of 1 to 30 (some longer than the block), some the model's own greedy ones."""
    words = prose(400)
    pairs = []
    for i in range(30):
        context = " ".join(words[i * 7: i * 7 + i % 9])[: (i * 11) % 41]
        length = [1, 2, 5, 9, 30][i % 5]
        choices = [" ".join(words[200 + i + k: 210 + i + k])[:length + k] for k in range(1 + i % 4)]
        if i % 3 == 0:
            choices[0] = greedy_text(random_model, context or "a", length)
            context = context or "a"
        pairs += [(encode_chars(context), encode_chars(c)) for c in choices]
    # No context: the first token has no prediction; a one-token continuation has nothing to score.
    pairs += [([], encode_chars(" the end")), ([], encode_chars("x"))]
    return pairs


def sequences(pairs):
    return [to_sequence(ctx, cont, BLOCK) for ctx, cont in pairs]


def test_batched_scores_equal_one_sequence_per_forward(random_model, varied):
    want = reference_scores(random_model, varied, BLOCK)
    assert any(greedy for _, greedy, _ in want.values())  # the greedy flag is tested, not all False
    assert len({count for _, _, count in want.values()}) > 5
    assert max(len(ctx) + len(cont) for ctx, cont in varied) > 2 * BLOCK
    scored = sum(count > 0 for _, _, count in want.values())  # one has nothing to score
    for batch_tokens, forwards in [(1, scored), (96, None), (10 ** 6, 1)]:
        calls = []
        with torch.no_grad():
            got = score_shard(sequences(varied), counting(random_model, calls), torch.device("cpu"),
                              batch_tokens=batch_tokens)
        assert_same_scores(got, want)
        if forwards is not None:
            assert len(calls) == forwards
        # Batches are padded to their longest sequence and hold at most batch_tokens padded tokens.
        assert all(x.numel() <= max(batch_tokens, x.shape[1]) for x in calls)


def counting(model, calls):
    def run(x, keep):
        calls.append(x.clone())
        return model(x, keep=keep)[0]
    return run


@pytest.mark.parametrize("n", [2, 3, 5])
def test_every_shard_makes_the_same_number_of_forward_calls(random_model, varied, n):
    """As a collective forward needs; the shards' work is uneven (varied lengths)."""
    batch_tokens = 40
    plans = [plan_batches(sequences(varied), (r, n), batch_tokens) for r in range(n)]
    assert len({len(p) for p in plans}) > 1
    parts, calls = [], []
    with torch.no_grad():
        for r in range(n):
            calls.append([])
            parts.append(score_shard(sequences(varied), counting(random_model, calls[-1]), torch.device("cpu"),
                                     (r, n), batch_tokens))
            # Another tensor-parallel rank of the same shard sends the model the very same inputs.
            again = []
            score_shard(sequences(varied), counting(random_model, again), torch.device("cpu"), (r, n), batch_tokens)
            assert len(again) == len(calls[-1]) and all(torch.equal(a, b) for a, b in zip(again, calls[-1]))
    assert [len(c) for c in calls] == [max(map(len, plans))] * n
    whole = {k: v for part in parts for k, v in part.items()}
    assert_same_scores(dict(sorted(whole.items())), reference_scores(random_model, varied, BLOCK))
