"""Random kill -9 of one trainer rank under torchrun --max-restarts: steps lost and time to the first
new step, resuming from the ring's restart slots vs from the persistent checkpoint alone.

    .venv/bin/python bench/ring_restart.py [--trials 10] [--job jobs/smoke.yaml]

Each trial starts a 2-rank CPU run (snapshot.every=5, checkpoint.every=50), waits for a random step
between 15 and 100, SIGKILLs one trainer at random, and reads from metrics.jsonl the step the
restarted workers resumed at and when they logged their first new step. Also printed: the loop's
mean time per snapshot step (the copy into the host buffers, the vote) with and without restart
slots, from the same runs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO  # noqa: E402

STEPS = 120
BASE = ["snapshot.every=5", "checkpoint.every=50", f"train.steps={STEPS}", "logging.every=1", "eval.every=0",
        "checkpoint.keep=1"]
MODES = {"ring (restart_every=1)": ["snapshot.restart_every=1"], "checkpoint only": ["snapshot.restart_every=0"]}


def records(run: Path) -> list[dict]:
    try:
        with open(run / "metrics.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def trial(job: str, data: str, extra: list[str], kill_at: int, root: Path, seed: int) -> dict:
    run = root / f"run{seed}"
    args = ["--job", job, f"data.dir={data}", f"run_dir={run}", f"snapshot.dir={run / 'snaps'}", *BASE, *extra]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                             "--max-restarts=1", "launcher/train.py", *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(r.get("step", 0) >= kill_at and "loss" in r for r in records(run)):
        time.sleep(0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before step {kill_at}")
    trainers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "launcher/train.py" in " ".join(p.cmdline())]
    last = max(r["step"] for r in records(run) if "loss" in r)
    killed = time.time()
    random.Random(seed).choice(trainers).send_signal(signal.SIGKILL)
    if proc.wait(timeout=600) != 0:
        raise RuntimeError(f"the restarted run failed (see {run})")
    rows = records(run)
    resume = [r for r in rows if r.get("event") == "resume"]
    resumed_at = resume[-1]["step"] if resume else 0
    first_new = next(r for r in rows if "loss" in r and r["time"] > killed and r["step"] == resumed_at + 1)
    snapshot_steps = [r["snapshot_s"] for r in rows if "snapshot_s" in r and r["step"] % 5 == 0]
    return {"lost": last - resumed_at, "to_first_step_s": first_new["time"] - killed,
            "snapshot_step_ms": 1e3 * statistics.mean(snapshot_steps)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--job", default="jobs/smoke.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ring_restart_") as tmp:
        root = Path(tmp)
        data = str(root / "data")
        rng = random.Random(0)
        kills = [rng.randint(15, 100) for _ in range(args.trials)]
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for i, kill_at in enumerate(kills):  # the modes interleaved, the same kill step for both
            for mode, extra in MODES.items():
                out = trial(args.job, data, extra, kill_at, root / mode.split()[0], i)
                results[mode].append(out)
                print(f"trial {i + 1}/{args.trials} {mode}: killed after step ~{kill_at}, lost {out['lost']} steps, "
                      f"first new step {out['to_first_step_s']:.1f} s after the kill", flush=True)
        print(f"\n{args.trials} trials, {args.job}, 2 gloo ranks on {os.cpu_count()} cores; snapshot.every=5, "
              f"checkpoint.every=50")
        print("| resume from | steps lost: mean (max) | kill → first new step, s: median (max) | "
              "loop time per snapshot step, ms |")
        print("|---|---:|---:|---:|")
        for mode, outs in results.items():
            lost = [o["lost"] for o in outs]
            wait = [o["to_first_step_s"] for o in outs]
            stall = statistics.median(o["snapshot_step_ms"] for o in outs)
            print(f"| {mode} | {statistics.mean(lost):.1f} ({max(lost)}) | {statistics.median(wait):.1f} "
                  f"({max(wait):.1f}) | {stall:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
