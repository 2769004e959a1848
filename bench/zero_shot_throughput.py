"""Zero-shot scoring throughput on CPU: one (context, continuation) per forward, as the scorer
was before batching, against `averaging.scoring`'s batched engine (the harness backend's), on the same examples.

    .venv/bin/python bench/zero_shot_throughput.py                  # gpt2-125m shape, ~2-3 min on 2 cores
    .venv/bin/python bench/zero_shot_throughput.py --size tiny --choice 64 --last-word 128
    .venv/bin/torchrun --standalone --nproc_per_node 2 bench/zero_shot_throughput.py --zero3

--zero3 scores as the sidecar does: 2 ranks, each its share of the examples, through a DeepSpeed
ZeRO-3 inference engine whose every forward gathers each layer's parameters from the other rank
(the sidecar's engine, core.engine); "one per forward" is then the batched scorer with
batch_tokens=1, which makes one forward per (context, continuation) as the scorer did before.

The model has random weights in a registry shape with GPT-2's padded vocabulary (50304), so the
output layer costs what it costs in GPT-2 small; the tokenizer is a byte-level BPE trained here on
`pydoc_data.topics` (Python's own help text). Two synthetic tasks are cut from the same text:
multiple choice like HellaSwag (a context of 60-100 tokens, 4 choices of 20-40) and last word like
LAMBADA (passages of 60-120 tokens). The script prints examples/s of each path per task, the
ratio, and checks that both paths give the same metrics (exit status 1 if not). It also prints
the load average and the process's CPU time / wall time per measurement: under 2 (threads) means
other work shared the cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from averaging.scoring import DEFAULT_BATCH_TOKENS, Encoded, full_logits, score_shard, to_sequence  # noqa: E402
from common import machine_info  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402
from models.registry import build_model, count_parameters, model_config  # noqa: E402

THREADS = 2
DEVICE = torch.device("cpu")  # --device


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    return Tokenizer("huggingface", tok.to_str(), eos_token="<|endoftext|>")


@dataclass
class Request:
    context: str
    continuations: list[str]
    answer: int


@dataclass
class Task:
    name: str
    kind: str  # "choice" or "last_word"
    requests: list[Request]


def continuation_ids(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole, ctx = encode(context + continuation), encode(context)
    return (ctx, whole[len(ctx):]) if whole[: len(ctx)] == ctx and len(whole) > len(ctx) else (ctx, encode(continuation))


def add_request(sums: dict[str, float], kind: str, request: Request, scored: list) -> None:
    """acc (and acc_norm per character) of a choice, acc and token log-likelihood of a last word."""
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


def summarize(task: Task, sums: dict[str, float]) -> dict[str, float]:
    if task.kind == "last_word":
        return {"acc": sums["correct"] / sums["n"], "ppl": math.exp(-sums["logprob"] / max(1.0, sums["tokens"])),
                "n": int(sums["n"])}
    return {"acc": sums["correct"] / sums["n"], "acc_norm": sums["correct_norm"] / sums["n"], "n": int(sums["n"])}


def task_sequences(task: Task, encode, block_size: int) -> tuple[list[Encoded], list[tuple[int, int]]]:
    keys = [(i, j) for i, r in enumerate(task.requests) for j in range(len(r.continuations))]
    return [to_sequence(*continuation_ids(encode, task.requests[i].context, task.requests[i].continuations[j]),
                        block_size) for i, j in keys], keys


def evaluate_task(task: Task, logits, encode, block_size: int, device, shard=(0, 1),
                  batch_tokens: int = DEFAULT_BATCH_TOKENS) -> dict[str, float]:
    """The sums over every request, scored by averaging/scoring.py's batched engine; with n > 1
    ranks (torchrun) each scores its shard of the sequences and the ranks swap their scores."""
    sequences, keys = task_sequences(task, encode, block_size)
    scores = score_shard(sequences, logits, device, shard, batch_tokens)
    if shard[1] > 1:
        import torch.distributed as dist

        parts = [None] * shard[1]
        dist.all_gather_object(parts, scores)
        scores = {k: v for part in parts for k, v in part.items()}
    by_key = {keys[k]: v for k, v in scores.items()}
    sums = {"n": 0.0, "correct": 0.0, "correct_norm": 0.0, "logprob": 0.0, "tokens": 0.0}
    for i, request in enumerate(task.requests):
        add_request(sums, task.kind, request, [by_key[i, j] for j in range(len(request.continuations))])
    return sums


def span(words: list[str], start: int, tokens: int, encode) -> str:
    """The words from `start` on, as few as reach `tokens` tokens (with the leading space that
    separates a continuation from its context)."""
    end = start + 1
    while len(encode(" " + " ".join(words[start:end]))) < tokens:
        end += 1
    return " " + " ".join(words[start:end])


def synthetic_tasks(words: list[str], encode, n_choice: int, n_last_word: int, seed: int) -> list[Task]:
    rng = random.Random(seed)
    choice = []
    for _ in range(n_choice):
        at = rng.randrange(len(words) - 400)
        context = span(words, at, rng.randint(60, 100), encode).lstrip()
        after = at + len(context.split())
        # The true continuation and three others from elsewhere, at a random place among them.
        choices = [span(words, after if k == 0 else rng.randrange(len(words) - 400), rng.randint(20, 40), encode)
                   for k in range(4)]
        answer = rng.randrange(4)
        choices[0], choices[answer] = choices[answer], choices[0]
        choice.append(Request(context, choices, answer))
    last_word = []
    for _ in range(n_last_word):
        text = span(words, rng.randrange(len(words) - 400), rng.randint(60, 120), encode).lstrip()
        cut = text.rfind(" ")
        last_word.append(Request(text[:cut], [text[cut:]], 0))
    return [Task("choice", "choice", choice), Task("last_word", "last_word", last_word)]


# ---------------------------------------------------------------------------------------------
# before: the scorer as it was, one (context, continuation) per forward


def score_one(model, encode, context: str, continuation: str, block_size: int) -> tuple[float, bool, int]:
    ctx, cont = continuation_ids(encode, context, continuation)
    ids = (ctx + cont)[-(block_size + 1):]
    x = torch.tensor(ids[:-1], dtype=torch.long, device=DEVICE).unsqueeze(0)  # (1, T)
    logits, _ = model(x)
    lp = torch.log_softmax(logits.float(), dim=-1)[0, -len(cont):]  # the whole (1, T, V), then its rows
    target = torch.tensor(cont, device=DEVICE)
    return lp.gather(-1, target.unsqueeze(-1)).sum().item(), bool((lp.argmax(-1) == target).all().item()), len(cont)


def evaluate_one_per_forward(task: Task, model, encode, block_size: int) -> dict[str, float]:
    sums = {"n": 0.0, "correct": 0.0, "correct_norm": 0.0, "logprob": 0.0, "tokens": 0.0}
    for request in task.requests:
        scored = [score_one(model, encode, request.context, c, block_size) for c in request.continuations]
        add_request(sums, task.kind, request, scored)  # the metrics' bookkeeping, shared with the scorer
    return sums


# ---------------------------------------------------------------------------------------------


def score_before(task: Task, model, encode, block_size: int) -> dict[str, float]:
    return summarize(task, evaluate_one_per_forward(task, model, encode, block_size))


def score_batched(task: Task, model, encode, block_size: int, batch_tokens: int) -> dict[str, float]:
    return summarize(task, evaluate_task(task, full_logits(model), encode, block_size, DEVICE,
                                         batch_tokens=batch_tokens))


def timed(fn):
    """(result, wall s, CPU s / wall s, 1-minute load average at the end)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu / wall, os.getloadavg()[0]


def same_metrics(a: dict, b: dict) -> bool:
    return all(math.isclose(a[k], b[k], rel_tol=1e-4) if k == "ppl" else a[k] == b[k] for k in a)


def score_zero3(tasks: list[Task], config, encode, batch_tokens: int) -> int:
    """Under torchrun: both paths through the sidecar's ZeRO-3 engine, each rank its shard."""
    import torch.distributed as dist

    from core.deepspeed_compat import use_deepspeed
    from core.distributed import build_parallel
    from core.engine import build_engine, deepspeed_config, inference_config

    device = torch.device("cpu")
    use_deepspeed("cpu").init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    par = build_parallel(1, int(os.environ.get("LOCAL_RANK", 0)), device)
    ds = inference_config(deepspeed_config(1, 1, par.dp, 1.0, 3, bf16=False), bf16=False)
    torch.manual_seed(0)
    engine = build_engine(lambda: build_model(config), ds, par)
    engine.eval()

    def logits(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        out, _ = engine(x, keep=keep)
        return out

    ok = True
    with torch.no_grad():
        logits(torch.zeros(1, 8, dtype=torch.long), None)
        for task in tasks:
            timings, metrics = [], []
            for budget in (1, batch_tokens):
                dist.barrier()
                start = time.perf_counter()
                sums = evaluate_task(task, logits, encode, config.block_size, device, (par.dp_rank, par.dp), budget)
                timings.append(time.perf_counter() - start)
                metrics.append(summarize(task, sums))
            equal = same_metrics(*metrics)
            ok &= equal
            if par.is_main:
                n = len(task.requests)
                print(f"\n== {task.name}, ZeRO-3 over {par.dp} ranks: {n} examples ==")
                print(f"one per forward: {n / timings[0]:8.3f} examples/s  ({timings[0]:6.1f} s)  {metrics[0]}")
                print(f"batched:         {n / timings[1]:8.3f} examples/s  ({timings[1]:6.1f} s)  {metrics[1]}")
                print(f"RATIO batched / one per forward = {timings[0] / timings[1]:.2f}x; metrics "
                      f"{'equal' if equal else 'DIFFER'}", flush=True)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="gpt2-125m", help="a models.registry size (default %(default)s)")
    parser.add_argument("--choice", type=int, default=8, help="multiple-choice examples (4 choices each)")
    parser.add_argument("--last-word", type=int, default=24, help="last-word examples")
    parser.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS)
    parser.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary trained on pydoc_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zero3", action="store_true", help="through the sidecar's ZeRO-3 engine (under torchrun)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (not with --zero3)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1 if args.zero3 else THREADS)
    start = time.perf_counter()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(machine_info()))
        print(f"$ {' '.join([os.path.relpath(sys.executable), *sys.argv])}")

    from pydoc_data.topics import topics

    texts = list(topics.values())
    tokenizer = train_tokenizer(texts, args.vocab)
    words = " ".join(texts).split()
    tasks = synthetic_tasks(words, tokenizer.encode, args.choice, args.last_word, args.seed)
    torch.manual_seed(args.seed)
    config = model_config(args.size, vocab_size=50304, block_size=1024)
    if args.zero3:
        return score_zero3(tasks, config, tokenizer.encode, args.batch_tokens)
    model = build_model(config).to(DEVICE).eval()
    print(f"model {args.size} on {DEVICE}: {count_parameters(config) / 1e6:.1f}M parameters, vocab {config.vocab_size}; "
          f"tokenizer BPE {tokenizer.vocab_size}; {THREADS} torch threads; batch_tokens {args.batch_tokens}")

    results, ok = {}, True
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long, device=DEVICE))  # first-call allocations out of the timings
        for task in tasks:
            lengths = [len(sum(continuation_ids(tokenizer.encode, r.context, c), [])) for r in task.requests
                       for c in r.continuations]
            n = len(task.requests)
            before, t0, cpu0, load0 = timed(partial(score_before, task, model, tokenizer.encode, config.block_size))
            after, t1, cpu1, load1 = timed(partial(score_batched, task, model, tokenizer.encode, config.block_size,
                                                   args.batch_tokens))
            equal = same_metrics(before, after)
            ok &= equal
            print(f"\n== {task.name}: {n} examples, {len(lengths)} sequences of {min(lengths)}-{max(lengths)} "
                  f"tokens (mean {sum(lengths) / len(lengths):.1f}) ==")
            print(f"one per forward: {n / t0:8.3f} examples/s  ({t0:6.1f} s, cpu/wall {cpu0:.2f}, load {load0:.2f})  {before}")
            print(f"batched:         {n / t1:8.3f} examples/s  ({t1:6.1f} s, cpu/wall {cpu1:.2f}, load {load1:.2f})  {after}")
            print(f"RATIO batched / one per forward = {t0 / t1:.2f}x; metrics {'equal' if equal else 'DIFFER'}")
            results[task.name] = {"examples": n, "before_s": t0, "after_s": t1, "ratio": t0 / t1,
                                  "before": before, "after": after, "metrics_equal": equal,
                                  "cpu_per_wall": [cpu0, cpu1], "load": [load0, load1]}
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "device": str(DEVICE), "batch_tokens": args.batch_tokens, **results}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
