"""Zero-shot evaluation on local task files, for any checkpoint, average or Hugging Face folder.

Two task formats, one JSON object per line:

  last word (LAMBADA-style)   {"text": "... the passage ending in its target word"}
      The context is the text up to its last space; the model must produce the last word
      (with its leading space) greedily. Reported: `acc` (every target token is the argmax) and
      `ppl` (perplexity of the target tokens).
  multiple choice (HellaSwag/PIQA-style)   {"context": "...", "choices": ["...", ...], "answer": 1}
      Each choice is scored by its summed log-likelihood after the context. Reported: `acc`
      (highest sum) and `acc_norm` (highest sum per character of the choice, lm-eval's length
      normalisation).

As in lm-eval, a continuation's tokens are those of `encode(context + continuation)` past
`encode(context)`, so tokenizers that merge across the boundary are handled; inputs longer than
the model's block size keep their last tokens.

Scoring is batched: each (context + continuation) is one sequence; a shard's sequences are sorted
longest first and cut into batches of at most `batch_tokens` padded tokens, one forward each.

    python -m averaging.zero_shot runs/x/lawa_best/step_00002000 --tasks lambada.jsonl piqa.jsonl
    python -m averaging.zero_shot hf/pythia-160m --tasks piqa.jsonl --tokenizer hf/pythia-160m
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from core import pickles

# (ids (B, T), keep (B, T) bool) -> logits (N, V) over the whole vocabulary at the N kept positions,
# in row-major order. Rows are right-padded: the model is causal, so a sequence's positions do not
# see the padding after it; only the kept positions go through the output head.
Logits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Encode = Callable[[str], list[int]]
Key = tuple[int, int]  # (request index, continuation index) within a task
Score = tuple[float, bool, int]  # (summed log-probability, every token the argmax, token count)

# Padded tokens per forward: a forward's activations grow with it (the logits only with the scored
# positions, N x V).
DEFAULT_BATCH_TOKENS = 2048


@dataclass
class Request:
    context: str
    continuations: list[str]
    answer: int


@dataclass(frozen=True)
class Encoded:
    """One (context, continuation) pair as the model sees it."""
    inputs: list[int]  # fed to the model, at most block_size tokens
    targets: list[int]  # the continuation's tokens, predicted by the last len(targets) positions


@dataclass
class Task:
    name: str
    kind: str  # "last_word" or "choice"
    requests: list[Request]
    # The tokenised sequences, for one (encode, block_size): the sidecar scores the same task at
    # every evaluation, and each rank tokenises every shard's requests to count their batches.
    _sequences: dict = field(default_factory=dict, repr=False, compare=False)


def load_task(path: str, limit: int = 0) -> Task:
    """A task file; the format is read off the first record and every record must follow it."""
    name = os.path.splitext(os.path.basename(path))[0]
    requests, kind = [], None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
            this = "last_word" if "text" in record else "choice" if "choices" in record else None
            if this is None or (kind is not None and this != kind):
                raise ValueError(f"{path}:{number}: expected {{\"text\": ...}} (last word) or {{\"context\", "
                                 f"\"choices\", \"answer\"}} (multiple choice) like the first record")
            kind = this
            if kind == "last_word":
                text = record["text"].rstrip()
                cut = text.rfind(" ")
                if cut <= 0:
                    raise ValueError(f"{path}:{number}: the text needs a context before its last word")
                requests.append(Request(text[:cut], [text[cut:]], 0))
            else:
                choices, answer = record["choices"], record.get("answer")
                if not isinstance(answer, int) or not 0 <= answer < len(choices):
                    raise ValueError(f"{path}:{number}: answer must index choices (0..{len(choices) - 1})")
                requests.append(Request(record.get("context", ""), [str(c) for c in choices], answer))
            if limit and len(requests) == limit:
                break
    if not requests:
        raise ValueError(f"{path}: no examples")
    return Task(name, kind, requests)


def continuation_ids(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = encode(context + continuation)
    ctx = encode(context)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(continuation)


def to_sequence(encode: Encode, context: str, continuation: str, block_size: int) -> Encoded:
    """Truncated per sequence, keeping its last block_size + 1 tokens (position i predicts token
    i + 1). A continuation longer than that window, or one with no context before it, keeps the
    tokens that still have a prediction."""
    ctx, cont = continuation_ids(encode, context, continuation)
    ids = (ctx + cont)[-(block_size + 1):]
    inputs = ids[:-1]
    scored = min(len(cont), len(inputs))
    return Encoded(inputs, cont[len(cont) - scored:])


def task_sequences(task: Task, encode: Encode, block_size: int) -> list[list[Encoded]]:
    """Every request's sequences, one per continuation (cached on the task)."""
    key = (encode, block_size)
    if key not in task._sequences:
        task._sequences.clear()
        task._sequences[key] = [[to_sequence(encode, r.context, c, block_size) for c in r.continuations]
                                for r in task.requests]
    return task._sequences[key]


def shard_requests(task: Task, shard: tuple[int, int]) -> range:
    rank, n = shard
    return range(rank, len(task.requests), n)


def make_batches(lengths: dict[Key, int], batch_tokens: int) -> list[list[Key]]:
    """Longest first, so that a batch is padded to its first sequence's length and one too big for
    memory fails at the start; at most batch_tokens padded tokens but never empty. The sort is
    stable (ties keep the task's order), so every rank cuts a shard into the same batches."""
    batches: list[list[Key]] = []
    for key in sorted(lengths, key=lambda k: -lengths[k]):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(key)
        else:
            batches.append([key])
    return batches


def plan_batches(task: Task, encode: Encode, block_size: int, shard: tuple[int, int] = (0, 1),
                 batch_tokens: int = DEFAULT_BATCH_TOKENS) -> list[list[Key]]:
    """A shard's batches. Any rank can compute any shard's: they depend on the task alone."""
    sequences = task_sequences(task, encode, block_size)
    # A sequence with nothing to predict needs no forward.
    lengths = {(i, j): len(s.inputs) for i in shard_requests(task, shard)
               for j, s in enumerate(sequences[i]) if s.targets}
    return make_batches(lengths, batch_tokens)


def score_batch(logits: Logits, batch: list[Encoded], device: torch.device) -> list[Score]:
    """One forward for the batch; only the rows that predict continuation tokens are
    log-softmaxed, never the whole (B, T, V)."""
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


def add_request(sums: dict[str, float], kind: str, request: Request, scored: list[Score]) -> None:
    sums["n"] += 1
    if kind == "last_word":
        total, greedy, count = scored[0]
        sums["correct"] += greedy
        sums["logprob"] += total
        sums["tokens"] += count
    else:
        best = max(range(len(scored)), key=lambda i: scored[i][0])
        best_norm = max(range(len(scored)), key=lambda i: scored[i][0] / max(1, len(request.continuations[i])))
        sums["correct"] += best == request.answer
        sums["correct_norm"] += best_norm == request.answer


def score_shard(task: Task, logits: Logits, encode: Encode, block_size: int, device: torch.device,
                shard: tuple[int, int] = (0, 1), batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[Key, Score]:
    """The score of every continuation of this shard's requests. With n > 1 shards every one makes
    the same number of forward calls (the busiest shard's), so a model whose forward is
    collective (ZeRO-3, tensor parallel) stays in step."""
    rank, n = shard
    sequences = task_sequences(task, encode, block_size)
    plans = [plan_batches(task, encode, block_size, (r, n), batch_tokens) for r in range(n)]
    # A continuation with nothing to predict is in no batch and scores nothing.
    scores = {(i, j): (0.0, True, 0) for i in shard_requests(task, shard)
              for j in range(len(task.requests[i].continuations))}
    for batch in plans[rank]:
        scores.update(zip(batch, score_batch(logits, [sequences[i][j] for i, j in batch], device)))
    for _ in range(max(map(len, plans)) - len(plans[rank])):
        logits(torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, dtype=torch.bool, device=device))
    return scores


def evaluate_task(task: Task, logits: Logits, encode: Encode, block_size: int, device: torch.device,
                  shard: tuple[int, int] = (0, 1), batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, float]:
    """Sums over this shard's requests (rank r of n takes r, r+n, ...); `summarize` turns the
    (possibly all-reduced) sums into metrics. Collective like `score_shard`."""
    scores = score_shard(task, logits, encode, block_size, device, shard, batch_tokens)
    sums = {"n": 0.0, "correct": 0.0, "correct_norm": 0.0, "logprob": 0.0, "tokens": 0.0}
    for i in shard_requests(task, shard):
        request = task.requests[i]
        add_request(sums, task.kind, request, [scores[i, j] for j in range(len(request.continuations))])
    return sums


def summarize(task: Task, sums: dict[str, float]) -> dict[str, float]:
    if task.kind == "last_word":
        return {"acc": sums["correct"] / sums["n"], "ppl": math.exp(-sums["logprob"] / max(1.0, sums["tokens"])),
                "n": int(sums["n"])}
    return {"acc": sums["correct"] / sums["n"], "acc_norm": sums["correct_norm"] / sums["n"], "n": int(sums["n"])}


def full_logits(model: torch.nn.Module) -> Logits:
    """For a single-process model of ours (no tensor parallelism)."""
    def run(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x, keep=keep)
        return logits
    return run


# ---------------------------------------------------------------------------------------------
# command line


def load_model(folder: str, run_dir: Optional[str]):
    """Our model, loaded tensor by tensor with a checkpoint/slot/average's weights or an HF folder's."""
    from core.zero_folder import load_module
    from models.hf import weight_source
    from models.registry import build_model

    source, config, run_dir = weight_source(folder, run_dir)
    model = build_model(config).eval()
    load_module(model, source)
    return model, config, run_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint/slot/average folder of a run, or a Hugging Face model folder")
    parser.add_argument("--tasks", nargs="+", required=True, help="task .jsonl files")
    parser.add_argument("--run-dir", default=None, help="the run the folder came from (default: found above it)")
    parser.add_argument("--tokenizer", default=None, help="default: the run's tokenizer, or the HF folder's")
    parser.add_argument("--limit", type=int, default=0, help="first N examples of each task (0: all)")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                        help="padded tokens per forward (default %(default)s; one sequence at least)")
    pickles.add_trust_option(parser)
    args = parser.parse_args(argv)
    try:
        from core.tokenizer import load_tokenizer
        from models.hf import run_tokenizer

        tasks = [load_task(p, args.limit) for p in args.tasks]
        with pickles.trusting(args.trust_pickle):
            model, config, run_dir = load_model(args.model, args.run_dir)
        tokenizer_path = args.tokenizer or (run_tokenizer(run_dir) if run_dir else args.model)
        if tokenizer_path is None:
            raise ValueError("cannot tell which tokenizer the model was trained with: pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {}
    with torch.no_grad():
        for task in tasks:
            sums = evaluate_task(task, full_logits(model), tokenizer.encode, config.block_size, torch.device("cpu"),
                                 batch_tokens=args.batch_tokens)
            results[task.name] = summarize(task, sums)
            print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in results[task.name].items()), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
