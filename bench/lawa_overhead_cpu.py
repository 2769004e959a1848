"""What online LAWA costs the training loop, measured with real 2-rank torchrun jobs on CPU.

    python bench/lawa_overhead_cpu.py [--job jobs/smoke.yaml|jobs/tiny_cpu.yaml] [--steps N]
                                      [--repeats R] [--out FILE.json] [--no-big]

Prints a header (date, machine, versions, every command it runs), three figures, and one JSON
line with everything (also written to --out). It measures and reports; it asserts nothing.

1. Training speed with snapshots + sidecar on vs off (ratio of steps/s).
   The job runs `--repeats` times in each of three modes, alternating on / snap / off, same
   steps, seed and data (`logging.every=E`, `eval.every=0`, `checkpoint.every` out of reach, so
   only the end of a run evaluates and checkpoints):
     on:   `snapshot.every=E sidecar.enabled=true lawa.spacing=0` (k stays the job's, default 5);
     snap: `snapshot.every=E sidecar.enabled=false`: snapshots without the sidecar, which tells
           the training loop's own cost apart from the sidecar competing for the same cores;
     off:  `snapshot.every=0 sidecar.enabled=false`.
   Speed comes from the launcher's own `tokens_per_s` records in metrics.jsonl, which leave out
   evaluation, checkpoints and the work done at log steps: steps/s = median over the log
   windows after the first (warm-up) of tokens_per_s / tokens per step. The figure is (median
   over on-runs) / (median over off-runs); snap/off likewise. The on-runs also give the number
   of sidecar evaluations (eval.jsonl; "during" = written before the last training log record),
   skipped or waited snapshots, and how far the sidecar lagged behind
   (eval record time - time of the log record of the same step, which follows the snapshot).

2. The training loop's stall per snapshot vs DeepSpeed's synchronous `save_checkpoint` (ratio).
   a) From the on-runs: metrics.jsonl `snapshot_s` (the loop's time in the partition copy plus any
      wait for the previous write; logging.every == snapshot.every, so one snapshot per window).
   b) In a 2-rank torchrun worker (`--worker`, this file) that builds the launcher's model and
      engine from the same job with the launcher's own functions, trains a few steps, then
      - snapshots with `SnapshotWriter.after_step` on due steps: `stall` is what it returns as
        snapshot_stall_s (the copy of the fp32 partition), `after_step` its wall time (the copy,
        one vote, starting the writer thread); `commit` is the wall time of after_step on the next,
        not-due step, which votes and commits the finished slot; `write` is the background
        thread's lifetime (polled; nothing else runs meanwhile). Median over snapshots of the
        slowest rank's value;
      - `engine.save_checkpoint(dir, tag)` between barriers, to disk (the default checkpoint
        place: beside the run dir) and to /dev/shm; median of 3 of the slowest rank.
      The figure is save_checkpoint(disk) / stall, also given per after_step wall time.
      Models: the job's own, `tiny` (jobs/tiny_cpu.yaml), and unless --no-big `gpt2-125m` at
      seq_len 128, micro batch 1, global batch 2 (vocabulary 4096, so 88M parameters).

3. Sidecar averaging throughput (GB/s of shards read and averaged).
   a) From the on-runs' eval.jsonl (rank 0's view; each record has read_s, average_s and
      bytes_averaged = k shards x this rank's fp32 bytes): bytes_averaged / (read_s + average_s)
      and bytes_averaged / average_s, median over records with k >= 2 (k = 1 averages nothing).
      The smoke model is tiny, so these are dominated by per-file costs.
   b) In this process, one thread (as a sidecar rank runs here, OMP_NUM_THREADS=1): k=5 flat
      fp32 shards of --synthetic-numel elements (default 100M, ~ a 774M model's shard with 8
      ranks) written with `averaging.slots.write_shard` + `commit` to /dev/shm, then
      `slots.read_shard` x5 (read, checksum, unpickle) and `lawa.average_shards`; median of 3.

Another job on the machine would distort every figure: before each measurement the script waits
(polling every 5 s, up to --wait-timeout s) until no `launcher/train.py` or `averaging.sidecar`
process other than its own runs, and it samples that during each measurement and flags any
measurement that overlapped one ("contended").
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUSY_PATTERNS = ("launcher/train.py", "averaging.sidecar")
DEFAULT_STEPS = {"smoke": 300}  # other jobs: FALLBACK_STEPS
FALLBACK_STEPS = 150
MODES = ("on", "snap", "off")  # snapshots + sidecar; snapshots only; neither
BIG_MODEL = ["model.size=gpt2-125m", "data.seq_len=128", "train.micro_batch_size=1", "train.global_batch_size=2"]


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------------
# not timing against other jobs


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        chain.append(pid)
    return chain


def foreign_jobs() -> list[int]:
    """Training or sidecar processes on this machine that this script did not start."""
    me, found = os.getpid(), set()
    for pattern in BUSY_PATTERNS:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            if pid != me and me not in _ancestors(pid):
                found.add(pid)
    return sorted(found)


def wait_until_idle(timeout_s: float) -> float:
    """Poll every 5 s until no foreign job runs; returns the seconds waited."""
    start = time.monotonic()
    busy = foreign_jobs()
    if busy:
        print(f"  waiting for other jobs to finish (pids {busy}) ...", flush=True)
    while busy:
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"other training jobs (pids {busy}) still run after {timeout_s:.0f}s; "
                             f"not timing against them")
        time.sleep(5)
        busy = foreign_jobs()
    return time.monotonic() - start


class Measurement:
    """Waits for an idle machine, then samples for foreign jobs while the measurement runs."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self.seen: set[int] = set()
        self._stop = threading.Event()

    def __enter__(self) -> "Measurement":
        self.waited_s = wait_until_idle(self.timeout_s)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            self.seen.update(foreign_jobs())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.seen:
            print(f"  WARNING: {self.name} overlapped other jobs (pids {sorted(self.seen)}): contended", flush=True)

    @property
    def contended(self) -> bool:
        return bool(self.seen)


# ---------------------------------------------------------------------------------------------
# running real jobs


def child_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # As tests/conftest.py: one JIT-extension cache per environment (DeepSpeed's CPU comm op).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]


def show_cmd(cmd: list[str]) -> str:
    env = child_env()
    prefix = f"OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR={env['TORCH_EXTENSIONS_DIR']}"
    return prefix + " " + " ".join(shlex.quote(c) for c in cmd)


def run_logged(cmd: list[str], log_path: Path, commands: list[str]) -> float:
    """Runs a command from the repo root with its output in log_path; returns its wall time."""
    commands.append(show_cmd(cmd))
    print(f"  $ {commands[-1]}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text()[-6000:]
        raise SystemExit(f"command exited {proc.returncode} after {wall:.0f}s:\n{commands[-1]}\n--- {log_path} (tail)\n{tail}")
    return wall


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# figure 1 (and 2a, 3a): the launcher with snapshots + sidecar on and off


def training_run(job: str, mode: str, steps: int, every: int, data_dir: Path, work: Path, shm: Path,
                 index: int, timeout_s: float, commands: list[str]) -> dict:
    run_dir = work / f"run_{mode}_{index}"
    overrides = [f"run_dir={run_dir}", f"data.dir={data_dir}", f"train.steps={steps}", f"logging.every={every}",
                 "eval.every=0", "checkpoint.every=100000000"]
    if mode in ("on", "snap"):
        overrides += [f"snapshot.every={every}", f"sidecar.enabled={'true' if mode == 'on' else 'false'}",
                      "lawa.spacing=0", f"snapshot.dir={shm / f'{mode}_{index}'}"]
    else:
        overrides += ["snapshot.every=0", "sidecar.enabled=false"]
    cmd = torchrun_cmd("launcher/train.py", "--job", job, *overrides)
    log_path = work / f"run_{mode}_{index}.log"
    with Measurement(f"training run {mode} #{index}", timeout_s) as m:
        wall = run_logged(cmd, log_path, commands)
    return {"repeat": index, **summarize_run(run_dir, log_path, mode, every, wall, m.contended)}


def summarize_run(run_dir: Path, log_path: Path, mode: str, every: int, wall: float, contended: bool) -> dict:
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tokens_per_step = config["train"]["global_batch_size"] * config["data"]["seq_len"]
    steps = config["train"]["steps"]
    windows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "tokens_per_s" in r]
    timed = windows[1:]  # the first window is warm-up
    out: dict[str, Any] = {
        "mode": mode, "wall_s": wall, "contended": contended, "steps": steps, "tokens_per_step": tokens_per_step,
        "windows_used": len(timed),
        "steps_per_s": median([r["tokens_per_s"] / tokens_per_step for r in timed]),
        "steps_per_s_windows": [r["tokens_per_s"] / tokens_per_step for r in windows],
    }
    if mode in ("on", "snap"):
        console = log_path.read_text()
        evals = read_jsonl(run_dir / "eval.jsonl")
        log_time = {r["step"]: r["time"] for r in windows}
        lags = [e["time"] - log_time[e["step"]] for e in evals if e["step"] in log_time]
        out.update({
            "snapshots_due": steps // every + (1 if steps % every else 0),
            "snapshots_skipped": console.count(" skipped: the write of step"),
            "snapshots_waited": console.count("s for the previous write"),
            "sidecar_restarts": console.count("sidecar died"),
            "snapshot_s_windows": [r.get("snapshot_s") for r in windows],
            "snapshot_s_median": median([r["snapshot_s"] for r in timed if "snapshot_s" in r]),
        })
    if mode == "on":
        out.update({
            "evals": len(evals),
            "evals_during_training": sum(1 for e in evals if windows and e["time"] < windows[-1]["time"]),
            "eval_steps": [e["step"] for e in evals],
            "eval_k": [e["k"] for e in evals],
            "sidecar_lag_s_median": median(lags),
            "sidecar_lag_s_max": max(lags) if lags else None,
            "eval_records": [{k: e[k] for k in ("step", "k", "read_s", "average_s", "bytes_averaged")} for e in evals],
        })
    return out


def figure_1(runs: list[dict]) -> dict:
    speed = {mode: [r["steps_per_s"] for r in runs if r["mode"] == mode] for mode in MODES}
    out: dict[str, Any] = {}
    for mode in MODES:
        out[f"steps_per_s_{mode}"] = speed[mode]
        out[f"steps_per_s_{mode}_median"] = median(speed[mode])
    out["ratio_on_off"] = out["steps_per_s_on_median"] / out["steps_per_s_off_median"]
    out["ratio_snap_off"] = out["steps_per_s_snap_median"] / out["steps_per_s_off_median"]
    for mode in ("on", "snap"):
        out[f"snapshot_s_median_launcher_{mode}"] = median([r["snapshot_s_median"] for r in runs if r["mode"] == mode])
    return out


def figure_3a(runs: list[dict]) -> dict:
    records = [e for r in runs if r["mode"] == "on" for e in r["eval_records"] if e["k"] >= 2]
    both = [e["bytes_averaged"] / (e["read_s"] + e["average_s"]) / 1e9 for e in records]
    avg = [e["bytes_averaged"] / e["average_s"] / 1e9 for e in records if e["average_s"] > 0]
    return {
        "records": len(records),
        "bytes_averaged_median": median([e["bytes_averaged"] for e in records]),
        "read_s_median": median([e["read_s"] for e in records]),
        "average_s_median": median([e["average_s"] for e in records]),
        "gb_per_s_read_and_average": median(both),
        "gb_per_s_average_only": median(avg),
    }


# ---------------------------------------------------------------------------------------------
# figure 2b: the worker (one rank of `torchrun ... bench/lawa_overhead_cpu.py --worker`)


def worker(args: argparse.Namespace) -> int:
    import logging
    import warnings

    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from launcher.config import (deepspeed_config, load_job, resolve_model_config, resolve_precision,
                                 validate_layout)
    from launcher.data import TokenBatches, ensure_prepared
    from launcher.distributed import barrier, init_distributed, rank_env
    from launcher.optim import build_optimizer
    from launcher.snapshot import SnapshotArgs, SnapshotWriter
    from models.registry import build_model, count_parameters

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

    # The launcher's construction, step for step (launcher/train.py: train()).
    job = load_job(args.job, args.overrides)
    grad_accum = validate_layout(job, rank_env().world_size)
    par = init_distributed(job.parallel.tensor)
    precision = resolve_precision(job, par.device.type)
    manifest = ensure_prepared(job.data, par.is_main, barrier)
    batches = TokenBatches(manifest, job.data.dir, [s.weight for s in job.data.sources], job.data.seq_len,
                           job.train.seed)
    model_config = resolve_model_config(job, batches.vocab_size)
    ds_config = deepspeed_config(job, par.dp, grad_accum, precision)
    torch.manual_seed(job.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=par.dp_group, mpu=par,
                             enabled=job.parallel.zero_stage == 3):
        model = build_model(model_config, par.tp_group)
    optimizer = build_optimizer(model, job.optimizer, par.device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=par)

    work = Path(args.worker_dir)
    snap_root = str(Path(args.worker_shm) / "snapshots")
    writer = SnapshotWriter(SnapshotArgs(every=2, slots=4, dir=snap_root), engine, par, snap_root, resume_step=0,
                            log=lambda m: print(f"[worker] {m}", flush=True) if par.is_main else None)

    def train_step(step: int) -> float:
        start = time.perf_counter()
        for micro in range(grad_accum):
            x, y = batches.train_batch(step, par.dp_rank, micro, job.train.micro_batch_size)
            _, loss = engine(x.to(par.device), y.to(par.device))
            engine.backward(loss)
            if micro == grad_accum - 1:
                writer.fence()
            engine.step()
        return time.perf_counter() - start

    tokens_per_step = job.train.global_batch_size * job.data.seq_len
    step = 0
    step_s = []
    for _ in range(args.warmup_steps):
        step += 1
        step_s.append(train_step(step))

    # Snapshots: due on even steps (every=2); the odd step after each one commits it.
    stall, after_wall, commit_wall, write_s = [], [], [], []
    for _ in range(args.snapshots):
        step += 1
        if step % 2:  # make the snapshot step even
            step_s.append(train_step(step))
            step += 1
        step_s.append(train_step(step))
        barrier()
        start = time.perf_counter()
        stats = writer.after_step(step, step * tokens_per_step, job.optimizer.lr)
        returned = time.perf_counter()
        if "snapshot_stall_s" not in stats:
            raise RuntimeError(f"no snapshot taken at step {step}: {stats}")
        stall.append(stats["snapshot_stall_s"] + stats.get("snapshot_wait_s", 0.0))
        after_wall.append(returned - start)
        while writer.thread is not None and writer.thread.is_alive():
            time.sleep(0.0005)
        write_s.append(time.perf_counter() - returned)
        if writer.failed is not None:
            raise RuntimeError(f"snapshot write failed: {writer.failed!r}")
        step += 1
        step_s.append(train_step(step))
        start = time.perf_counter()
        writer.after_step(step, step * tokens_per_step, job.optimizer.lr)  # not due: votes and commits
        commit_wall.append(time.perf_counter() - start)
        if writer.last_committed != step - 1:
            raise RuntimeError(f"snapshot of step {step - 1} was not committed (last: {writer.last_committed})")
    slot_bytes = dir_bytes(os.path.join(snap_root, f"step_{writer.last_committed:08d}")) if par.local_rank == 0 else 0

    # DeepSpeed's synchronous checkpoint of the same engine, to disk and to /dev/shm.
    saves: dict[str, list[float]] = {}
    ckpt_bytes: dict[str, int] = {}
    for where, root in (("disk", work / "checkpoints"), ("shm", Path(args.worker_shm) / "checkpoints")):
        saves[where] = []
        for i in range(args.saves):
            tag = f"bench_{i}"
            barrier()
            start = time.perf_counter()
            engine.save_checkpoint(str(root), tag=tag, client_state={"run_state": {"step": step}}, save_latest=False)
            barrier()
            saves[where].append(time.perf_counter() - start)
            if par.is_main:
                ckpt_bytes[where] = dir_bytes(str(root / tag))
                shutil.rmtree(root / tag, ignore_errors=True)
            barrier()

    # The slowest rank's value of each sample (the loop waits for it at the next collective).
    mine = {"stall": stall, "after_wall": after_wall, "commit_wall": commit_wall, "write": write_s,
            "step": step_s[1:], **{f"save_{w}": v for w, v in saves.items()}}
    gathered: list[Any] = [None] * par.world_size
    dist.all_gather_object(gathered, mine, group=par.ctrl_group)
    writer.cleanup()
    if par.is_main:
        slowest = {key: [max(g[key][i] for g in gathered) for i in range(len(mine[key]))] for key in mine}
        partition = sum(f.numel() for f in writer.flat)
        result = {
            "job": args.job, "overrides": [o for o in args.overrides if not o.startswith(("data.dir", "run_dir"))],
            "model": job.model.size, "params": count_parameters(model_config), "seq_len": job.data.seq_len,
            "global_batch_size": job.train.global_batch_size, "micro_batch_size": job.train.micro_batch_size,
            "partition_elements_per_rank": partition, "slot_bytes": slot_bytes,
            "checkpoint_bytes_disk": ckpt_bytes.get("disk"), "checkpoint_bytes_shm": ckpt_bytes.get("shm"),
            "samples": slowest,
            "train_step_s": median(slowest["step"]),
            "stall_s": median(slowest["stall"]),
            "after_step_s": median(slowest["after_wall"]),
            "commit_step_s": median(slowest["commit_wall"]),
            "write_s": median(slowest["write"]),
            "save_checkpoint_disk_s": median(slowest["save_disk"]),
            "save_checkpoint_shm_s": median(slowest["save_shm"]),
        }
        result["ratio_save_disk_over_stall"] = result["save_checkpoint_disk_s"] / result["stall_s"]
        result["ratio_save_disk_over_after_step"] = result["save_checkpoint_disk_s"] / result["after_step_s"]
        result["ratio_save_shm_over_stall"] = result["save_checkpoint_shm_s"] / result["stall_s"]
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
    barrier()
    return 0


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def worker_run(label: str, job: str, overrides: list[str], data_dir: Path, work: Path, shm: Path,
               snapshots: int, timeout_s: float, commands: list[str]) -> dict:
    wdir, wshm = work / f"worker_{label}", shm / f"worker_{label}"
    wdir.mkdir()
    out = wdir / "result.json"
    cmd = torchrun_cmd("bench/lawa_overhead_cpu.py", "--worker", "--job", job, "--worker-out", str(out),
                       "--worker-dir", str(wdir), "--worker-shm", str(wshm), "--snapshots", str(snapshots),
                       "--", f"data.dir={data_dir}", f"run_dir={wdir}", *overrides)
    with Measurement(f"worker {label}", timeout_s) as m:
        wall = run_logged(cmd, work / f"worker_{label}.log", commands)
    result = json.loads(out.read_text())
    result.update(label=label, wall_s=wall, contended=m.contended)
    shutil.rmtree(wshm, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------
# figure 3b: averaging a large synthetic shard set in-process


def synthetic_average(root: Path, k: int, numel: int, repeats: int) -> dict:
    import torch

    from averaging import slots
    from averaging.lawa import average_shards

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a sidecar rank here runs with OMP_NUM_THREADS=1
    try:
        flat = torch.randn(numel, dtype=torch.float32)
        model_states = {"dp_world_size": 8, "ds_version": metadata.version("deepspeed")}
        paths, write_s = [], []
        for i in range(k):
            flat.add_(0.001)  # distinct contents per slot
            path = str(root / slots.slot_name(10 * (i + 1)))
            start = time.perf_counter()
            written = slots.write_shard(path, 0, 0, [flat], model_states)
            slots.commit(path, {"step": 10 * (i + 1), "dp": 8, "tp": 1, "files": written})
            write_s.append(time.perf_counter() - start)
            paths.append(path)
        del flat
        read_s, average_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            shards = [slots.read_shard(p, 0, 0)[0] for p in paths]
            mid = time.perf_counter()
            averaged = average_shards(shards)
            end = time.perf_counter()
            read_s.append(mid - start)
            average_s.append(end - mid)
            del shards, averaged
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    nbytes = k * numel * 4
    r, a = median(read_s), median(average_s)
    return {
        "k": k, "numel_per_shard": numel, "bytes": nbytes, "threads": 1,
        "write_s_per_shard": write_s, "read_s": read_s, "average_s": average_s,
        "read_s_median": r, "average_s_median": a,
        "gb_per_s_read": nbytes / r / 1e9,
        "gb_per_s_read_and_average": nbytes / (r + a) / 1e9,
        "gb_per_s_average_only": nbytes / a / 1e9,
    }


# ---------------------------------------------------------------------------------------------
# report


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": metadata.version("deepspeed"), "git_commit": commit}


def runs_of(values: list) -> str:
    """[1, 2, 5, 5, 5] -> '1,2,5x3'."""
    out: list[str] = []
    for v in values:
        if out and out[-1].split("x")[0] == str(v):
            head, _, n = out[-1].partition("x")
            out[-1] = f"{head}x{int(n or 1) + 1}"
        else:
            out.append(str(v))
    return ",".join(out)


def ms(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f}"


def print_report(res: dict) -> None:
    f1, runs = res["figure_1"], res["training_runs"]
    print(f"\n== 1. training speed, snapshots + sidecar on vs off ({res['job']}, {res['steps']} steps, "
          f"snapshot.every={res['snapshot_every']}, median of log windows 2..n) ==")
    print("| run | steps/s | windows | wall s | snapshots due | skipped | waited | snapshot_s median ms | "
          "evals (during training) | k of evals | sidecar lag median / max s | contended |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in runs:
        cells = ["-"] * 7
        if r["mode"] in ("on", "snap"):
            cells[:4] = [str(r["snapshots_due"]), str(r["snapshots_skipped"]), str(r["snapshots_waited"]),
                         ms(r["snapshot_s_median"])]
        if r["mode"] == "on":
            lag = ("n/a" if r["sidecar_lag_s_median"] is None
                   else f"{r['sidecar_lag_s_median']:.2f} / {r['sidecar_lag_s_max']:.2f}")
            cells[4:] = [f"{r['evals']} ({r['evals_during_training']})", runs_of(r["eval_k"]), lag]
        print(f"| {r['mode']} #{r['repeat']} | {r['steps_per_s']:.3f} | {r['windows_used']} | {r['wall_s']:.1f} | "
              + " | ".join(cells) + f" | {'YES' if r['contended'] else 'no'} |")
    for mode in MODES:
        print(f"steps/s {mode}: median {f1[f'steps_per_s_{mode}_median']:.3f} of "
              f"{[round(x, 3) for x in f1[f'steps_per_s_{mode}']]}")
    for name in ("on", "snap"):
        ratio = f1[f"ratio_{name}_off"]
        print(f"RATIO {name}/off = {ratio:.4f} (steps/s {(ratio - 1) * 100:+.2f}%, step time {(1 / ratio - 1) * 100:+.2f}%)")

    print("\n== 2. training-loop stall per snapshot vs DeepSpeed save_checkpoint (slowest rank, median) ==")
    print(f"launcher, metrics.jsonl snapshot_s per window (one snapshot each), median over runs: "
          f"on-runs {ms(f1['snapshot_s_median_launcher_on'])} ms, snap-runs {ms(f1['snapshot_s_median_launcher_snap'])} ms")
    print("| model | params | fp32 shard MB/rank | train step ms | stall (copy) ms | after_step ms | commit step ms | "
          "background write ms | save_checkpoint disk ms | save_checkpoint /dev/shm ms | checkpoint MB | "
          "save(disk)/stall | save(disk)/after_step | contended |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for w in res["workers"]:
        print(f"| {w['label']} | {w['params'] / 1e6:.2f}M | {w['partition_elements_per_rank'] * 4 / 1e6:.2f} | "
              f"{ms(w['train_step_s'])} | {ms(w['stall_s'])} | {ms(w['after_step_s'])} | {ms(w['commit_step_s'])} | "
              f"{ms(w['write_s'])} | {ms(w['save_checkpoint_disk_s'])} | {ms(w['save_checkpoint_shm_s'])} | "
              f"{w['checkpoint_bytes_disk'] / 1e6:.1f} | {w['ratio_save_disk_over_stall']:.1f} | "
              f"{w['ratio_save_disk_over_after_step']:.1f} | {'YES' if w['contended'] else 'no'} |")

    f3a, f3b = res["figure_3a"], res["figure_3b"]
    print("\n== 3. sidecar averaging throughput ==")
    if f3a["records"]:
        print(f"eval.jsonl of the on-runs (rank 0, {f3a['records']} records with k >= 2; median "
              f"{f3a['bytes_averaged_median'] / 1e6:.3f} MB averaged, read {ms(f3a['read_s_median'])} ms, "
              f"average {ms(f3a['average_s_median'])} ms): read+average {f3a['gb_per_s_read_and_average']:.3f} GB/s, "
              f"average alone {f3a['gb_per_s_average_only']:.3f} GB/s")
    else:
        print("eval.jsonl of the on-runs: no record averaged k >= 2 shards")
    print(f"synthetic, in-process, 1 thread, /dev/shm: k={f3b['k']} x {f3b['numel_per_shard'] / 1e6:.0f}M fp32 "
          f"({f3b['bytes'] / 1e9:.2f} GB): read {f3b['read_s_median']:.3f} s ({f3b['gb_per_s_read']:.3f} GB/s), "
          f"average {f3b['average_s_median']:.3f} s; read+average {f3b['gb_per_s_read_and_average']:.3f} GB/s, "
          f"average alone {f3b['gb_per_s_average_only']:.3f} GB/s "
          f"(contended: {'YES' if f3b['contended'] else 'no'})")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/smoke.yaml")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps per on/off run (default {DEFAULT_STEPS} by job name, else {FALLBACK_STEPS})")
    parser.add_argument("--repeats", type=int, default=2, help="on/off pairs, alternating")
    parser.add_argument("--snapshot-every", type=int, default=10, help="snapshot.every (and logging.every) of the on-runs")
    parser.add_argument("--snapshots", type=int, default=5, help="snapshots timed in each worker (gpt2-125m: 3)")
    parser.add_argument("--no-big", action="store_true", help="skip the gpt2-125m worker")
    parser.add_argument("--synthetic-numel", type=int, default=100_000_000)
    parser.add_argument("--wait-timeout", type=float, default=600.0, help="longest wait for other jobs to end, s")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run directories")
    # the worker (run by torchrun from this script)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-shm", help=argparse.SUPPRESS)
    parser.add_argument("--warmup-steps", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--saves", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from launcher.distributed import exit_process

        exit_process(worker(args))

    from launcher.config import load_job
    from launcher.data import prepare

    started = time.perf_counter()
    job = load_job(REPO / args.job)
    steps = args.steps or DEFAULT_STEPS.get(job.name, FALLBACK_STEPS)
    info = machine_info()
    commands: list[str] = []
    print("# LAWA overhead on CPU (bench/lawa_overhead_cpu.py)")
    print(f"date: {info['date']}  host: {info['host']}  git: {info['git_commit']}")
    print(f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB RAM")
    print(f"python {info['python']}, torch {info['torch']}, deepspeed {info['deepspeed']}")
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"job: {args.job}, {steps} steps, snapshot.every={args.snapshot_every}, repeats={args.repeats}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="lawa-bench-"))
    shm = Path(tempfile.mkdtemp(prefix="lawa-bench-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        data_dir = work / "data"
        print(f"preparing the corpus once in {data_dir} (not timed) ...", flush=True)
        wait_until_idle(args.wait_timeout)  # not to slow another job down either
        prepare(load_job(REPO / args.job, [f"data.dir={data_dir}"]).data, progress=False)

        print("\n[1] training runs, alternating on/off", flush=True)
        runs = []
        for i in range(args.repeats):
            for mode in MODES:
                runs.append(training_run(args.job, mode, steps, args.snapshot_every, data_dir, work, shm, i,
                                         args.wait_timeout, commands))
                r = runs[-1]
                print(f"  {mode} #{i}: {r['steps_per_s']:.3f} steps/s, wall {r['wall_s']:.1f}s"
                      + (f", {r['evals']} sidecar evals" if mode == "on" else ""), flush=True)

        print("\n[2] snapshot stall vs save_checkpoint (workers)", flush=True)
        worker_specs = [(job.model.size, args.job, [], args.snapshots)]
        if job.model.size != "tiny":
            worker_specs.append(("tiny", "jobs/tiny_cpu.yaml", [], args.snapshots))
        if not args.no_big:
            worker_specs.append(("gpt2-125m", "jobs/tiny_cpu.yaml", BIG_MODEL, min(args.snapshots, 3)))
        workers = []
        for label, wjob, overrides, n in worker_specs:
            workers.append(worker_run(label, wjob, overrides, data_dir, work, shm, n, args.wait_timeout, commands))
            w = workers[-1]
            print(f"  {label}: stall {ms(w['stall_s'])} ms, save_checkpoint {ms(w['save_checkpoint_disk_s'])} ms "
                  f"(wall {w['wall_s']:.1f}s)", flush=True)

        print("\n[3] synthetic averaging in-process", flush=True)
        with Measurement("synthetic averaging", args.wait_timeout) as m:
            synthetic = synthetic_average(shm / "synthetic", 5, args.synthetic_numel, 3)
        synthetic["contended"] = m.contended

        res = {
            "bench": "lawa_overhead_cpu", "machine": info, "argv": sys.argv, "job": args.job, "steps": steps,
            "snapshot_every": args.snapshot_every, "repeats": args.repeats, "commands": commands,
            "figure_1": figure_1(runs), "figure_3a": figure_3a(runs), "figure_3b": synthetic,
            "training_runs": runs, "workers": workers,
            "contended": any(r["contended"] for r in runs + workers) or synthetic["contended"],
        }
        res["figure_2"] = {w["label"]: {k: w[k] for k in ("stall_s", "after_step_s", "commit_step_s", "write_s",
                                                           "save_checkpoint_disk_s", "save_checkpoint_shm_s",
                                                           "ratio_save_disk_over_stall",
                                                           "ratio_save_disk_over_after_step")} for w in workers}
        res["total_s"] = time.perf_counter() - started
        print_report(res)
        print(f"\ntotal time {res['total_s']:.0f}s" + ("  (SOME MEASUREMENTS CONTENDED)" if res["contended"] else ""))
        line = json.dumps(res)
        print(line)
        if args.out:
            Path(args.out).write_text(line + "\n")
    finally:
        if args.keep:
            print(f"kept {work} and {shm}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
