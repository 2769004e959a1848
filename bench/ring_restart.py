"""Failures against the ring's restart slots: steps lost and time to the first new step, resuming
from the ring (with buddy copies on two nodes) vs from the persistent checkpoint alone.

    .venv/bin/python bench/ring_restart.py [--trials 10] [--nodes 1|2] [--replaced 5] [--job jobs/smoke.yaml]
    .venv/bin/python bench/ring_restart.py --stall 3 [--nodes 1|2]

`--nodes 1`: 2 CPU ranks on this machine. `--nodes 2`: two emulated nodes of 2 ranks each
(tests/emulated_nodes.py: namespaces, their own /dev/shm; needs root and `ip netns`), one torchrun
agent per node, as the multi-node tests run. Every run: snapshot.every=5, checkpoint.every=50.

- kill trials: at a random step between 15 and 100 one trainer rank, chosen at random, is
  SIGKILLed; torchrun (`--max-restarts=1`) restarts the workers (on every node).
- replaced trials (`--nodes 2`): at a random step both nodes' processes are killed and node2's
  /dev/shm is emptied, as a replacement node would come; the same command is started again.

Steps lost: the last step logged before the failure minus the step resumed at; time: from the
kill (kill trials) or the new start (replaced trials) to the first new step's log line. Also
printed, from the kill trials' runs: the loop's mean time per snapshot step (the copy into the host
buffers, the vote) and the median tokens/s, with and without restart slots (and buddy copies).
`--stall N` measures those two alone, on N uninterrupted runs per variant: weights-only snapshots,
restart slots, and (two nodes) restart slots with buddy copies.
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
from typing import Optional

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import REPO  # noqa: E402

STEPS = 120
BIN = Path(sys.executable).parent
BASE = ["snapshot.every=5", "checkpoint.every=50", f"train.steps={STEPS}", "logging.every=1", "eval.every=0",
        "checkpoint.keep=1", "sidecar.enabled=false"]
SHM = "/dev/shm/lawa-bench"


def modes(nodes: int) -> dict[str, list[str]]:
    ring = ["snapshot.restart_every=1"] + (["snapshot.replicate=buddy"] if nodes > 1 else [])
    name = "ring (restart_every=1" + (", replicate=buddy)" if nodes > 1 else ")")
    return {name: ring, "checkpoint only": ["snapshot.restart_every=0"]}


def records(run: Path) -> list[dict]:
    try:
        with open(run / "metrics.jsonl") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def last_step(run: Path) -> int:
    return max((r["step"] for r in records(run) if "loss" in r), default=0)


class Launch:
    """One start of a job: torchrun on this machine, or one agent per emulated node."""

    def __init__(self, args: list[str], cluster=None, max_restarts: int = 1, tag: str = "run"):
        self.cluster = cluster
        torchrun = [str(BIN / "torchrun"), f"--max-restarts={max_restarts}"]
        if cluster is None:
            self.procs = [subprocess.Popen([*torchrun, "--standalone", "--nproc_per_node=2", "launcher/train.py",
                                            *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        else:
            self.procs = [node.popen([*torchrun, "--nnodes", str(len(cluster.nodes)), "--nproc_per_node", "2",
                                      "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{cluster.nodes[0].name}:29400",
                                      "--rdzv_id", tag, "launcher/train.py", *args], cwd=str(REPO),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                          for node in cluster.nodes]

    def trainers(self) -> list[psutil.Process]:
        pids = [p.pid for proc in self.procs for p in psutil.Process(proc.pid).children(recursive=True)] \
            if self.cluster is None else [pid for node in self.cluster.nodes for pid in node.processes()]
        found = []
        for pid in pids:
            try:
                cmd = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            if "launcher/train.py" in cmd and "torchrun" not in cmd:
                found.append(psutil.Process(pid))
        return found

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def wait(self, timeout: float = 600) -> list[int]:
        return [p.wait(timeout=timeout) for p in self.procs]


def wait_for_step(run: Path, step: int, launch: Launch) -> int:
    while last_step(run) < step:
        time.sleep(0.01)
        if not launch.running():
            raise RuntimeError(f"the run ended before step {step} (see {run})")
    return last_step(run)


def outcome(run: Path, lost_after: int, since: float) -> dict:
    rows = records(run)
    resume = [r for r in rows if r.get("event") == "resume"]
    resumed_at = resume[-1]["step"] if resume else 0
    first_new = next(r for r in rows if "loss" in r and r["time"] > since and r["step"] == resumed_at + 1)
    return {"lost": lost_after - resumed_at, "to_first_step_s": first_new["time"] - since}


def kill_trial(job: str, data: str, extra: list[str], kill_at: int, root: Path, seed: int, cluster) -> dict:
    run = root / f"run{seed}"
    args = ["--job", job, f"data.dir={data}", f"run_dir={run}", f"snapshot.dir={SHM}/{root.name}-{seed}", *BASE,
            *extra]
    launch = Launch(args, cluster, tag=f"{root.name}-{seed}")
    wait_for_step(run, kill_at, launch)
    last, killed = last_step(run), time.time()
    random.Random(seed).choice(launch.trainers()).send_signal(signal.SIGKILL)
    if launch.wait() != [0] * len(launch.procs):
        raise RuntimeError(f"the restarted run failed (see {run})")
    rows = records(run)
    snapshot_steps = [r["snapshot_s"] for r in rows if "snapshot_s" in r and r["step"] % 5 == 0]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] % 5 != 0]
    return {**outcome(run, last, killed), "snapshot_step_ms": 1e3 * statistics.mean(snapshot_steps),
            "tokens_per_s": statistics.median(speed)}


def replaced_trial(job: str, data: str, extra: list[str], kill_at: int, root: Path, seed: int, cluster) -> dict:
    run = root / f"replaced{seed}"
    args = ["--job", job, f"data.dir={data}", f"run_dir={run}", f"snapshot.dir={SHM}/{root.name}-r{seed}", *BASE,
            *extra]
    launch = Launch(args, cluster, max_restarts=0, tag=f"{root.name}-r{seed}")
    wait_for_step(run, kill_at, launch)
    for node in reversed(cluster.nodes):
        node.kill()
    launch.wait(60)
    last = last_step(run)
    cluster.nodes[1].wipe_shm()
    started = time.time()
    again = Launch(args, cluster, max_restarts=0, tag=f"{root.name}-r{seed}-again")
    if again.wait() != [0] * len(again.procs):
        raise RuntimeError(f"the restarted run failed (see {run})")
    return outcome(run, last, started)


def stall_run(job: str, data: str, extra: list[str], root: Path, seed: int, cluster) -> dict:
    """An uninterrupted run: the loop's time per snapshot step and the median tokens/s."""
    run = root / f"stall{seed}"
    args = ["--job", job, f"data.dir={data}", f"run_dir={run}", f"snapshot.dir={SHM}/{root.name}-s{seed}", *BASE,
            *extra]
    launch = Launch(args, cluster, max_restarts=0, tag=f"{root.name}-s{seed}")
    if launch.wait() != [0] * len(launch.procs):
        raise RuntimeError(f"the run failed (see {run})")
    rows = [r for r in records(run) if r.get("step", 0) > 10]  # past the start-up
    return {"snapshot_step_ms": 1e3 * statistics.mean(r["snapshot_s"] for r in rows if "snapshot_s" in r and r["step"] % 5 == 0),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] % 5)}


def stall_table(job: str, data: str, root: Path, rounds: int, cluster) -> None:
    nodes = 1 if cluster is None else len(cluster.nodes)
    variants = {"weights only (restart_every=0)": ["snapshot.restart_every=0"],
                "restart slots (restart_every=1)": ["snapshot.restart_every=1"]}
    if nodes > 1:
        variants["restart slots + buddy copies"] = ["snapshot.restart_every=1", "snapshot.replicate=buddy"]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(rounds):  # interleaved, so drifts in the machine's load fall on every variant
        for v, (name, extra) in enumerate(variants.items()):
            results[name].append(stall_run(job, data, extra, root / f"stall-v{v}", i, cluster))
            print(f"stall round {i + 1}/{rounds} {name}: {results[name][-1]}", flush=True)
    base = statistics.median(o["tokens_per_s"] for o in results[next(iter(variants))])
    print(f"\nthe loop at the snapshot cadence (snapshot.every=5), {rounds} uninterrupted runs each, interleaved")
    print("| snapshots | loop time per snapshot step, ms: median | tokens/s: median | vs weights only |")
    print("|---|---:|---:|---:|")
    for name, outs in results.items():
        speed = statistics.median(o["tokens_per_s"] for o in outs)
        print(f"| {name} | {statistics.median(o['snapshot_step_ms'] for o in outs):.2f} | {speed:,.0f} | "
              f"{speed / base:.3f} |")


def prepare(job: str, data: str) -> None:
    """The data once, before any timing (the first run would prepare it otherwise)."""
    subprocess.run([str(BIN / "python"), "-c", "import sys; from launcher.config import load_job; "
                    "from launcher.data import ensure_prepared; "
                    "ensure_prepared(load_job(sys.argv[1], [f'data.dir={sys.argv[2]}']).data, True, lambda: None)",
                    job, data], cwd=REPO, check=True, capture_output=True)


def table(title: str, results: dict[str, list[dict]], speeds: bool) -> None:
    print(f"\n{title}")
    head = "| resume from | steps lost: mean (max) | failure → first new step, s: median (max) |"
    print(head + (" loop time per snapshot step, ms | tokens/s, median |" if speeds else ""))
    print("|---|---:|---:|" + ("---:|---:|" if speeds else ""))
    for mode, outs in results.items():
        lost, wait = [o["lost"] for o in outs], [o["to_first_step_s"] for o in outs]
        row = f"| {mode} | {statistics.mean(lost):.1f} ({max(lost)}) | {statistics.median(wait):.1f} ({max(wait):.1f}) |"
        if speeds:
            row += (f" {statistics.median(o['snapshot_step_ms'] for o in outs):.2f} |"
                    f" {statistics.median(o['tokens_per_s'] for o in outs):,.0f} |")
        print(row)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kill trials per mode")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2))
    parser.add_argument("--replaced", type=int, default=5, help="replaced-node trials per mode (--nodes 2)")
    parser.add_argument("--stall", type=int, default=0, metavar="ROUNDS",
                        help="instead of failures: uninterrupted runs with and without restart slots (and copies)")
    parser.add_argument("--job", default="jobs/smoke.yaml")
    args = parser.parse_args()
    cluster: Optional[object] = None
    with tempfile.TemporaryDirectory(prefix="ring_restart_") as tmp:
        root = Path(tmp)
        data = str(root / "data")
        prepare(args.job, data)
        if args.nodes == 2:
            sys.path.insert(0, str(REPO / "tests"))
            import emulated_nodes

            why = emulated_nodes.missing()
            if why:
                print(f"cannot emulate two nodes here: {why}", file=sys.stderr)
                return 2
            cluster = emulated_nodes.Cluster(root / "nodes", nodes=2, net=76, shm_mb=256).start()
        try:
            if args.stall:
                stall_table(args.job, data, root, args.stall, cluster)
                return 0
            rng = random.Random(0)
            kinds = {"kill": (kill_trial, args.trials)}
            if cluster is not None:
                kinds["replaced"] = (replaced_trial, args.replaced)
            for kind, (trial, count) in kinds.items():
                steps = [rng.randint(15, 100) for _ in range(count)]
                results: dict[str, list[dict]] = {mode: [] for mode in modes(args.nodes)}
                for i, at in enumerate(steps):  # the modes interleaved, the same failure step for both
                    for mode, extra in modes(args.nodes).items():
                        out = trial(args.job, data, extra, at, root / f"{kind}-{mode.split()[0]}", i, cluster)
                        results[mode].append(out)
                        print(f"{kind} trial {i + 1}/{count} {mode}: after step ~{at}, lost {out['lost']} steps, "
                              f"first new step {out['to_first_step_s']:.1f} s later", flush=True)
                where = "2 gloo ranks" if cluster is None else "2 emulated nodes × 2 gloo ranks"
                table(f"{count} {kind} trials, {args.job}, {where} on {os.cpu_count()} cores; snapshot.every=5, "
                      f"checkpoint.every=50", results, speeds=kind == "kill")
        finally:
            if cluster is not None:
                cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
