"""Step time of the same tiny model at TP=2 x DP=2 vs TP=1 x DP=4 (4 CPU processes, gloo, ZeRO-3).

    .venv/bin/python bench/tp_step_time_cpu.py [--steps 80] [--repeats 2]

Prints, for each layout, the median training step time over log windows after the first (the
launcher's own tokens/s, which excludes evaluation and checkpoints), and the ratio. On a CPU this
says what tensor parallelism's extra all-reduces cost when the compute does not need splitting;
it is not a GPU figure. Both layouts see the same 32 sequences x 128 tokens per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from common import run_logged, torchrun_cmd
from core.files import read_jsonl
from core.run_dir import RunDir


def run(layout_tp: int, steps: int, data_dir: str, run_dir: str) -> float:
    cmd = torchrun_cmd("launcher/train.py", "--job", "jobs/tiny_cpu.yaml",
                       f"run_dir={run_dir}", f"data.dir={data_dir}", f"parallel.tensor={layout_tp}", f"train.steps={steps}",
                       "train.micro_batch_size=8", "logging.every=10", "eval.every=0", "checkpoint.every=100000",
                       "snapshot.every=0", "sidecar.enabled=false", "schedule.warmup_steps=10", "cooldowns.at=[]", nproc=4)
    run_logged(cmd, Path(run_dir + ".log"), [])
    records = [r for r in read_jsonl(RunDir(run_dir).metrics) if "tokens_per_s" in r]
    tokens_per_step = 32 * 128
    return statistics.median(tokens_per_step / r["tokens_per_s"] for r in records[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        times: dict[str, list[float]] = {"tp2_dp2": [], "tp1_dp4": []}
        for r in range(args.repeats):  # alternate, so that machine noise hits both
            for name, tp in (("tp2_dp2", 2), ("tp1_dp4", 1)):
                times[name].append(run(tp, args.steps, data_dir, os.path.join(tmp, f"{name}_{r}")))
                print(f"{name} run {r}: {times[name][-1] * 1e3:.1f} ms/step", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"nproc {os.cpu_count()}, 4 ranks, tiny model (4L/128d), 32 x 128 tokens per step")
    print(f"TP=2 x DP=2: {med['tp2_dp2'] * 1e3:.1f} ms/step   TP=1 x DP=4: {med['tp1_dp4'] * 1e3:.1f} ms/step   "
          f"ratio (TP2xDP2 / TP1xDP4): {med['tp2_dp2'] / med['tp1_dp4']:.3f}")
    print(json.dumps({"ms_per_step": {k: [round(t * 1e3, 2) for t in v] for k, v in times.items()},
                      "ratio": med["tp2_dp2"] / med["tp1_dp4"]}))


if __name__ == "__main__":
    main()
