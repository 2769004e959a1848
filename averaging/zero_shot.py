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

    python -m averaging.zero_shot runs/x/lawa_best/step_00002000 --tasks lambada.jsonl piqa.jsonl
    python -m averaging.zero_shot hf/pythia-160m --tasks piqa.jsonl --tokenizer hf/pythia-160m
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# ids (1, T) -> log-probabilities (1, T, V) over the whole vocabulary
LogProbs = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Request:
    context: str
    continuations: list[str]
    answer: int


@dataclass
class Task:
    name: str
    kind: str  # "last_word" or "choice"
    requests: list[Request]


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


def continuation_ids(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = encode(context + continuation)
    ctx = encode(context)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(continuation)


def score(log_probs: LogProbs, encode: Callable[[str], list[int]], context: str, continuation: str,
          block_size: int, device: torch.device) -> tuple[float, bool, int]:
    """(summed log-probability of the continuation, whether it is the greedy one, its token count)."""
    ctx, cont = continuation_ids(encode, context, continuation)
    ids = (ctx + cont)[-(block_size + 1):]
    x = torch.tensor(ids[:-1], dtype=torch.long, device=device).unsqueeze(0)  # (1, T)
    lp = log_probs(x)[0, -len(cont):].float()  # (n, V): predictions of the continuation's tokens
    target = torch.tensor(cont, device=lp.device)
    total = lp.gather(-1, target.unsqueeze(-1)).sum().item()
    greedy = bool((lp.argmax(-1) == target).all().item())
    return total, greedy, len(cont)


def forward_calls(task: Task, shard: tuple[int, int]) -> int:
    rank, n = shard
    return sum(len(r.continuations) for r in task.requests[rank::n])


def evaluate_task(task: Task, log_probs: LogProbs, encode, block_size: int, device: torch.device,
                  shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Sums over this shard's requests (rank r of n takes r, r+n, ...); `summarize` turns the
    (possibly all-reduced) sums into metrics. With n > 1 every shard makes the same number of
    forward calls (the busiest shard's), so a model whose forward is collective (ZeRO-3, tensor
    parallel) stays in step."""
    rank, n = shard
    spare = max(forward_calls(task, (r, n)) for r in range(n)) - forward_calls(task, shard)
    sums = {"n": 0.0, "correct": 0.0, "correct_norm": 0.0, "logprob": 0.0, "tokens": 0.0}
    for request in task.requests[rank::n]:
        scored = [score(log_probs, encode, request.context, c, block_size, device) for c in request.continuations]
        sums["n"] += 1
        if task.kind == "last_word":
            total, greedy, count = scored[0]
            sums["correct"] += greedy
            sums["logprob"] += total
            sums["tokens"] += count
        else:
            best = max(range(len(scored)), key=lambda i: scored[i][0])
            best_norm = max(range(len(scored)), key=lambda i: scored[i][0] / max(1, len(request.continuations[i])))
            sums["correct"] += best == request.answer
            sums["correct_norm"] += best_norm == request.answer
    for _ in range(spare):
        log_probs(torch.zeros(1, 1, dtype=torch.long, device=device))
    return sums


def summarize(task: Task, sums: dict[str, float]) -> dict[str, float]:
    if task.kind == "last_word":
        return {"acc": sums["correct"] / sums["n"], "ppl": math.exp(-sums["logprob"] / max(1.0, sums["tokens"])),
                "n": int(sums["n"])}
    return {"acc": sums["correct"] / sums["n"], "acc_norm": sums["correct_norm"] / sums["n"], "n": int(sums["n"])}


def full_log_probs(model: torch.nn.Module) -> LogProbs:
    """For a single-process model of ours (no tensor parallelism): its logits, log-softmaxed."""
    def run(x: torch.Tensor) -> torch.Tensor:
        logits, _ = model(x)
        return torch.log_softmax(logits.float(), dim=-1)
    return run


# ---------------------------------------------------------------------------------------------
# command line


def load_model(folder: str, run_dir: Optional[str]):
    """Our model, loaded with a checkpoint/slot/average's consolidated weights or an HF folder's."""
    from models.hf import read_weights
    from models.registry import build_model

    state_dict, config, run_dir = read_weights(folder, run_dir)
    model = build_model(config).eval()
    model.load_state_dict(state_dict)
    return model, config, run_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint/slot/average folder of a run, or a Hugging Face model folder")
    parser.add_argument("--tasks", nargs="+", required=True, help="task .jsonl files")
    parser.add_argument("--run-dir", default=None, help="the run the folder came from (default: found above it)")
    parser.add_argument("--tokenizer", default=None, help="default: the run's tokenizer, or the HF folder's")
    parser.add_argument("--limit", type=int, default=0, help="first N examples of each task (0: all)")
    args = parser.parse_args(argv)
    try:
        from core.tokenizer import load_tokenizer
        from models.hf import run_tokenizer

        tasks = [load_task(p, args.limit) for p in args.tasks]
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
            sums = evaluate_task(task, full_log_probs(model), tokenizer.encode, config.block_size, torch.device("cpu"))
            results[task.name] = summarize(task, sums)
            print(f"{task.name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in results[task.name].items()), flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
