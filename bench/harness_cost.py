"""What lm-evaluation-harness tasks cost: seconds to score one model (raw, a merge, EMA/SWA) on each
shipped tiny task through our backend, and the training loop's tokens/s with the sidecar scoring
those tasks at every snapshot vs not scoring them.

    .venv/bin/python bench/harness_cost.py                 # ~4 min on 2 cores
    .venv/bin/python bench/harness_cost.py --steps 200 --repeats 2

1. In this process (2 torch threads): the default job's model shape (tiny, random weights) with a
   byte-level BPE trained on `pydoc_data`; each task of `tests/harness_tasks` evaluated alone,
   median of 3, as the sidecar evaluates one model.
2. `jobs/tiny_cpu.yaml` on 2 ranks (cosine, no cooldowns, snapshot.every=10, the sidecar on), with
   and without `eval.harness_tasks` = the four shipped tasks: the median tokens/s of the logging
   windows after the first. The sidecar shares the 2 cores with the trainers here, so the second
   figure is the worst case: on a GPU node it has its own cores.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import REPO, machine_info, median, run_logged, torchrun_cmd

TASK_DIR = REPO / "tests" / "harness_tasks"
TASKS = ["tiny_choice", "tiny_last_word", "tiny_perplexity", "tiny_completion"]


def per_task_seconds() -> dict[str, float]:
    from pydoc_data.topics import topics

    from zero_shot_throughput import train_tokenizer

    from averaging.harness import ShardedLM, evaluate, load_tasks
    from averaging.scoring import full_logits
    from models.registry import build_model, count_parameters, model_config

    torch.set_num_threads(2)
    tokenizer = train_tokenizer(list(topics.values()), 4096)
    config = model_config("tiny", vocab_size=4096, block_size=128)
    torch.manual_seed(0)
    model = build_model(config).eval()
    print(f"model tiny: {count_parameters(config) / 1e6:.2f}M parameters, block 128; 2 torch threads")
    lm = ShardedLM(full_logits(model), tokenizer, config.block_size, torch.device("cpu"))
    out = {}
    for task in TASKS:
        loaded = load_tasks([task], str(TASK_DIR))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            evaluate(lm, loaded)
            times.append(time.perf_counter() - start)
        out[task] = statistics.median(times)
        print(f"  {task}: {out[task]:.3f} s per model scored", flush=True)
    return out


def tokens_per_s(tasks_on: bool, steps: int, work: Path, commands: list[str]) -> tuple[float, int]:
    run_dir = work / f"run_{'tasks' if tasks_on else 'plain'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = [f"eval.harness_tasks=[{', '.join(TASKS)}]", f"eval.harness_include={TASK_DIR}"] if tasks_on else []
    run_logged(torchrun_cmd("launcher/train.py", "--job", "jobs/tiny_cpu.yaml", f"run_dir={run_dir}",
                            f"train.steps={steps}", "schedule.name=cosine", "cooldowns.at=[]", "snapshot.every=10",
                            "sidecar.enabled=true", "logging.every=10", "eval.every=0",
                            f"snapshot.dir={work / 'ring'}", "checkpoint.every=100000000", *extra),
               work / f"{run_dir.name}.log", commands)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    return median(windows), sum("tasks" in r for r in evals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(machine_info()))
    print(f"$ {' '.join([sys.executable, *sys.argv])}")
    start = time.perf_counter()
    print("\n== 1. seconds to score one model, per task ==")
    seconds = per_task_seconds()
    print("\n== 2. training tokens/s, the sidecar scoring the tasks at every snapshot or not ==")
    commands: list[str] = []
    figures: dict[str, list[float]] = {"off": [], "on": []}
    scored = 0
    with tempfile.TemporaryDirectory(prefix="lawa-harness-", dir="/dev/shm") as tmp:
        for _ in range(args.repeats):
            for name in ("off", "on"):
                tok_s, n = tokens_per_s(name == "on", args.steps, Path(tmp), commands)
                figures[name].append(tok_s)
                scored = max(scored, n) if name == "on" else scored
                print(f"  tasks {name}: {tok_s:,.0f} tokens/s" + (f" ({n} evaluations scored the tasks)"
                                                                   if name == "on" else ""), flush=True)
    off, on = median(figures["off"]), median(figures["on"])
    print(f"\nRATIO tokens/s with tasks / without = {on / off:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")
    print(json.dumps({"seconds_per_model": seconds, "tokens_per_s": figures, "ratio": on / off,
                      "evaluations_with_tasks": scored, "commands": commands}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
