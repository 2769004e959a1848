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
   b) In bench/lawa_overhead_worker.py under torchrun (2 ranks), which builds the launcher's own
      training setup (launcher.trainer.build) from the same job and times SnapshotWriter.after_step
      and its background write against engine.save_checkpoint (to disk and to /dev/shm); see its
      docstring. Models: the job's own, `tiny` (jobs/tiny_cpu.yaml), and unless --no-big
      `gpt2-125m` at seq_len 128, micro batch 1, global batch 2 (vocabulary 4096, so 88M parameters).

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
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from common import REPO, Measurement, machine_info, median, ms, run_logged, torchrun_cmd, wait_until_idle

DEFAULT_STEPS = {"smoke": 300}  # other jobs: FALLBACK_STEPS
FALLBACK_STEPS = 150
MODES = ("on", "snap", "off")  # snapshots + sidecar; snapshots only; neither
BIG_MODEL = ["model.size=gpt2-125m", "data.seq_len=128", "train.micro_batch_size=1", "train.global_batch_size=2"]


# ---------------------------------------------------------------------------------------------
# figure 1 (and 2a, 3a): the launcher with snapshots + sidecar on and off


def training_run(job: str, mode: str, steps: int, every: int, data_dir: Path, work: Path, shm: Path,
                 index: int, timeout_s: float, commands: list[str]) -> dict:
    run_dir = work / f"run_{mode}_{index}"
    overrides = [f"run_dir={run_dir}", f"data.dir={data_dir}", f"train.steps={steps}", f"logging.every={every}",
                 "eval.every=0", "checkpoint.every=100000000", "cooldowns.at=[]"]
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
    from core.files import read_jsonl
    from core.run_dir import RunDir
    from launcher.config import load_job

    run = RunDir(str(run_dir))
    job = load_job(run.config)
    tokens_per_step = job.train.global_batch_size * job.data.seq_len
    steps = job.train.steps
    windows = [r for r in read_jsonl(run.metrics) if "tokens_per_s" in r]
    timed = windows[1:]  # the first window is warm-up
    out: dict[str, Any] = {
        "mode": mode, "wall_s": wall, "contended": contended, "steps": steps, "tokens_per_step": tokens_per_step,
        "windows_used": len(timed),
        "steps_per_s": median([r["tokens_per_s"] / tokens_per_step for r in timed]),
        "steps_per_s_windows": [r["tokens_per_s"] / tokens_per_step for r in windows],
    }
    if mode in ("on", "snap"):
        console = log_path.read_text()
        evals = read_jsonl(run.eval_log)
        log_time = {r["step"]: r["time"] for r in windows}
        lags = [e["time"] - log_time[e["step"]] for e in evals if e["step"] in log_time]
        out.update({
            "snapshots_due": steps // every + (1 if steps % every else 0),
            "snapshots_skipped": sum(r.get("snapshots_skipped", 0) for r in windows),
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
# figure 2b: bench/lawa_overhead_worker.py under torchrun


def worker_run(label: str, job: str, overrides: list[str], data_dir: Path, work: Path, shm: Path,
               snapshots: int, timeout_s: float, commands: list[str]) -> dict:
    wdir, wshm = work / f"worker_{label}", shm / f"worker_{label}"
    wdir.mkdir()
    out = wdir / "result.json"
    cmd = torchrun_cmd("bench/lawa_overhead_worker.py", "--job", job, "--out", str(out), "--dir", str(wdir),
                       "--shm", str(wshm), "--snapshots", str(snapshots),
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
    from core.files import step_name

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a sidecar rank here runs with OMP_NUM_THREADS=1
    try:
        flat = torch.randn(numel, dtype=torch.float32)
        model_states = {"dp_world_size": 8, "ds_version": machine_info()["deepspeed"]}
        paths, write_s = [], []
        for i in range(k):
            flat.add_(0.001)  # distinct contents per slot
            path = str(root / step_name(10 * (i + 1)))
            start = time.perf_counter()
            written = slots.write_shard(path, 0, 0, [flat], model_states)
            slots.commit(path, slots.SlotManifest(kind="raw", step=10 * (i + 1), tokens=0, lr=None, dp=8, tp=1,
                                                  param_shapes=[], files=written))
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
    args = parser.parse_args(argv)

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
