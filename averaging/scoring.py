"""Batched log-likelihood scoring of token sequences: the engine under the lm-evaluation-harness
backend (`averaging/harness.py`), for one process or a group of ranks whose forward is collective.

A sequence is a context's tokens followed by a continuation's, truncated on its own to its last
`block_size + 1` tokens (position i predicts token i + 1); only the continuation's tokens are
scored. A shard's sequences are sorted longest first and cut into batches of at most
`batch_tokens` padded tokens, right-padded (the model is causal: a position never sees the padding
after it), one forward each; only the rows that predict continuation tokens go through the output
head and the log-softmax, never the whole (B, T, V).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (ids (B, T), keep (B, T) bool) -> logits (N, V) over the whole vocabulary at the N kept positions,
# in row-major order.
Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Score = tuple[float, bool, int]  # (summed log-probability, every token the argmax, token count)

# Padded tokens per forward: a forward's activations grow with it (the logits only with the scored
# positions, N x V).
DEFAULT_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class Encoded:
    """One (context, continuation) pair as the model sees it."""
    inputs: list[int]  # fed to the model, at most block_size tokens
    targets: list[int]  # the continuation's tokens, predicted by the last len(targets) positions


def to_sequence(context: list[int], continuation: list[int], block_size: int) -> Encoded:
    """Keeps the last block_size + 1 tokens. A continuation longer than that window, or one with no
    context before it, keeps the tokens that still have a prediction."""
    ids = (context + continuation)[-(block_size + 1):]
    inputs = ids[:-1]
    scored = min(len(continuation), len(inputs))
    return Encoded(inputs, continuation[len(continuation) - scored:])


def make_batches(lengths: dict[int, int], batch_tokens: int) -> list[list[int]]:
    """Longest first, so that a batch is padded to its first sequence's length and one too big for
    memory fails at the start; at most batch_tokens padded tokens but never empty. The sort is
    stable (ties keep their order), so every rank cuts a shard into the same batches."""
    batches: list[list[int]] = []
    for key in sorted(lengths, key=lambda k: -lengths[k]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(key)
        else:
            batches.append([key])
    return batches


def plan_batches(sequences: list[Encoded], shard: tuple[int, int] = (0, 1),
                 batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[list[int]]:
    """Shard (r, n)'s batches: the sequences r, r + n, ... with something to predict. Any rank can
    compute any shard's: they depend on the sequences alone."""
    rank, n = shard
    return make_batches({i: len(sequences[i].inputs) for i in range(rank, len(sequences), n)
                         if sequences[i].targets}, batch_tokens)


def score_batch(logits: Logits, batch: list[Encoded], device: torch.device) -> list[Score]:
    """One forward for the batch."""
    width = max(len(s.inputs) for s in batch)
    x = torch.tensor([s.inputs + [0] * (width - len(s.inputs)) for s in batch], dtype=torch.long, device=device)
    rows = [b for b, s in enumerate(batch) for _ in s.targets]
    cols = [p for s in batch for p in range(len(s.inputs) - len(s.targets), len(s.inputs))]
    keep = torch.zeros(x.shape, dtype=torch.bool, device=device)
    keep[torch.tensor(rows), torch.tensor(cols)] = True
    out = logits(x, keep)  # (N, V): the predictions of the continuation tokens, row-major
    owner = torch.tensor(rows, device=out.device)
    log_probs = torch.log_softmax(out.float(), dim=-1)  # (N, V)
    target = torch.tensor([t for s in batch for t in s.targets], device=out.device)  # (N,)
    per_token = torch.stack([log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1),
                             (log_probs.argmax(-1) != target).float()])  # (2, N): log-prob, miss
    per_sequence = torch.zeros(2, len(batch), device=out.device).index_add_(1, owner, per_token)
    totals, misses = per_sequence.tolist()  # one device sync per batch
    return [(total, miss == 0, len(s.targets)) for total, miss, s in zip(totals, misses, batch)]


def idle_forward(logits: Logits, device: torch.device) -> None:
    """A one-token forward whose result is dropped: a rank with less work keeps a collective
    forward in step with the others."""
    logits(torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, dtype=torch.bool, device=device))


def score_shard(sequences: list[Encoded], logits: Logits, device: torch.device, shard: tuple[int, int] = (0, 1),
                batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[int, Score]:
    """The scores of shard (r, n)'s sequences, by index. With n > 1 shards every one makes the same
    number of forward calls (the busiest shard's), so a model whose forward is collective (ZeRO-3,
    tensor parallel) stays in step."""
    rank, n = shard
    plans = [plan_batches(sequences, (r, n), batch_tokens) for r in range(n)]
    # A continuation with nothing to predict is in no batch and scores nothing.
    scores = {i: (0.0, True, 0) for i in range(rank, len(sequences), n)}
    for batch in plans[rank]:
        scores.update(zip(batch, score_batch(logits, [sequences[i] for i in batch], device)))
    for _ in range(max(map(len, plans)) - len(plans[rank])):
        idle_forward(logits, device)
    return scores


def full_logits(model: torch.nn.Module) -> Logits:
    """For a single-process model of ours (no tensor parallelism)."""
    def run(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x, keep=keep)
        return logits
    return run
