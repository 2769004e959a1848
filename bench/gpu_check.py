"""The GPU check, prepared to run in one go when a session is lent a GPU: every CUDA path of the
launcher, its throughput against plain compiled PyTorch, and what online LAWA costs.

    python bench/gpu_check.py --out OUT                 # one GPU: everything ends within --budget-s (420)
    python bench/gpu_check.py --out OUT --parts correctness --budget-s 150   # a rerun of one part
    python bench/gpu_check.py --dry --out OUT           # CPU, tiny sizes: what the test suite runs

One command, one process tree; every measurement runs in a child process (its own memory peak, its
own compile caches), in the order of what matters most, and one still running at the budget is
stopped and says so. OUT/gpu_check.json holds every figure with the device, versions and date, and
OUT/gpu_check.md the tables, both rewritten as each step ends. A part that fails records its error
and the rest still run.

1. correctness, each part held to a fraction of the 0.01-0.17 nats this project measures between
   merges, and a failure says which part and by how much: the smoke job on one device (NCCL, bf16 on
   a GPU), snapshots and the sidecar on the same device, EMA and SWA; a run stopped at step 6 and
   resumed has the uninterrupted run's losses to 1e-5 nats (both with train.deterministic: torch's
   deterministic algorithms and a fixed cuBLAS workspace); the sidecar's best average, exported to
   Hugging Face, is scored by our model and by transformers in fp32 alike (1e-5 relative), and by
   transformers in bf16 as the sidecar scored it, within bf16's own effect on the same batches.
2. throughput, at seq 1024 (dry: 64), per model size: the launcher's training step (default, and
   each ZeRO stage eager and compiled: torch.compile of the whole model at ZeRO-1/2, of each block as
   one graph at ZeRO-3; ZeRO-3 buckets sized from the model; activation checkpointing) against a
   plain single-device PyTorch loop of the same model (torch.compile, SDPA, fused AdamW, bf16
   autocast), same tokens per optimizer step; tokens/s, model TFLOP/s (6N + 12·L·d·T per token),
   peak memory, the ratio, and each variant's losses against the default's (a speed-up that changes
   the numbers beyond rounding is not one).
3. LAWA's cost at the smallest size: the loop's stall per snapshot (and as a share of training time
   at snapshot.every=200), and tokens/s with snapshots + sidecar on vs off.
4. zero-shot scoring (bench/zero_shot_throughput.py): examples/s one sequence per forward vs batched,
   gpt2-125m shape (dry: micro, on the CPU), and that both give the same metrics.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from gpu_report import markdown

from common import REPO, child_env, median
from core.files import write_file_atomic

# (size, micro batch, accumulation steps) at seq 1024: 64 sequences (65k tokens) per optimizer step,
# 1/8 of the GPT-2 recipes' 512, on one GPU.
GPU_SIZES = {"125m": ("gpt2-125m", 16, 4), "350m": ("gpt2-350m", 16, 4), "770m": ("gpt2-770m", 8, 8)}
DRY_SIZES = {"micro": ("micro", 2, 2)}
# The launcher's configurations: on one GPU `parallel.zero_stage: auto` takes ZeRO-1, so the default
# is DeepSpeed's fast path; then each stage eager and compiled (the whole model at ZeRO-1/2, each block
# as one graph at ZeRO-3), ZeRO-3's model-sized buckets, activation checkpointing. Measured in this
# order, each at every size, after every size's reference and default; the budget cuts the tail.
# Every one's losses are held to the default's.
VARIANTS = {"default": [], "compile": ["train.compile=inductor"], "zero2": ["parallel.zero_stage=2"],
            "zero2_compile": ["parallel.zero_stage=2", "train.compile=inductor"],
            "zero3_compile": ["parallel.zero_stage=3", "train.compile=inductor"], "zero3": ["parallel.zero_stage=3"],
            "zero3_buckets": ["parallel.zero_stage=3", "parallel.zero_buckets=auto"],
            "checkpointing": ["train.activation_checkpointing=true"]}
DRY_VARIANTS = {name: [o.replace("=inductor", "=aot_eager") for o in extra] for name, extra in VARIANTS.items()}


def gpu_job(args, run_dir: Path, *extra: str) -> list[str]:
    """The smoke job on one device, at this mode's settings."""
    return ["--job", "jobs/smoke.yaml", f"data.dir={args.data}", f"run_dir={run_dir}", "train.steps=12",
            "eval.every=6", "checkpoint.every=6", "logging.every=1", "snapshot.every=2", "lawa.k=3", "lawa.spacing=2",
            "ema.enabled=true", "ema.half_life=4", "swa.enabled=true", "swa.start_step=4", "sidecar.enabled=true",
            "sidecar.poll_seconds=0.2", "sidecar.export_hf=true", f"snapshot.dir={run_dir / 'snaps'}",
            *(["train.precision=bf16"] if args.dry else []), *extra]


class OutOfBudget(Exception):
    """A measurement not started, or stopped, because the run's time budget (--budget-s) is spent."""


def run_child(cmd: list[str], log: Path, deadline: float) -> float:
    """`cmd` in a process session of its own, its output to `log`, ended whole (every process it
    started) at the deadline; returns its wall time."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise OutOfBudget("out of the time budget")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise OutOfBudget(f"stopped at the time budget after {time.perf_counter() - start:.0f} s ({log.name})") \
                from None
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def launch(args, train_args: list[str], log: Path) -> float:
    """launcher/train.py on one device through torchrun, as a user starts it; returns its wall time."""
    return run_child([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1",
                      "launcher/train.py", *train_args], log, args.deadline)


def losses(run_dir: Path) -> dict[int, float]:
    from core.files import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "loss" in r}


# ---------------------------------------------------------------------------------------------
# 1. correctness
#
# What each part is held to. The effects this project measures are 0.01-0.17 nats (one merge
# against another, a merge against the raw weights), so no check may be looser than a small
# fraction of that, and each failure says which part and by how much.

RESUME_TOL_NATS = 1e-5  # deterministic algorithms on both runs: the resumed run is the uninterrupted one
FP32_EXPORT_TOL = 1e-5  # relative: our model and transformers on the exported weights, both fp32
BF16_FLOOR_NATS = 1e-3  # bf16 scores agree to bf16's own effect on these batches, and never looser than this


def resume_check(whole: dict[int, float], resumed: dict[int, float]) -> dict[str, Any]:
    """The resumed run's losses against the uninterrupted run's, step by step."""
    if set(whole) != set(resumed):
        only = sorted(set(whole) ^ set(resumed))
        return {"max_abs_loss_diff": None, "tolerance": RESUME_TOL_NATS,
                "failure": f"resume: steps {only} were logged by one run only"}
    step = max(whole, key=lambda k: abs(whole[k] - resumed[k]))
    diff = abs(whole[step] - resumed[step])
    failure = None if diff <= RESUME_TOL_NATS else (
        f"resume: at step {step} the resumed run's loss is {diff:.2e} nats from the uninterrupted run's "
        f"({resumed[step]:.6f} vs {whole[step]:.6f}; tolerance {RESUME_TOL_NATS:.0e})")
    return {"max_abs_loss_diff": diff, "at_step": step, "tolerance": RESUME_TOL_NATS, "failure": failure}


def export_check(sidecar: float, ours_fp32: float, theirs_fp32: float, theirs_bf16: Optional[float]) -> dict[str, Any]:
    """The sidecar's score of its best average against its Hugging Face export, on the same batches:
    our model and transformers both in fp32 (the export maps every weight), and the sidecar against
    transformers at the sidecar's precision (`theirs_bf16` where the sidecar scored in bf16, else
    None): within bf16's own effect on these batches (transformers bf16 against fp32), or 1e-5
    relative in fp32 (the export holds the average the sidecar scored)."""
    fp32_rel = abs(ours_fp32 - theirs_fp32) / abs(theirs_fp32)
    theirs = theirs_fp32 if theirs_bf16 is None else theirs_bf16
    bf16_effect = None if theirs_bf16 is None else abs(theirs_bf16 - theirs_fp32)
    tolerance = FP32_EXPORT_TOL * abs(theirs_fp32) if bf16_effect is None else max(bf16_effect, BF16_FLOOR_NATS)
    diff = abs(sidecar - theirs)
    failures = []
    if fp32_rel > FP32_EXPORT_TOL:
        failures.append(f"export: our model scores the exported weights {ours_fp32:.6f}, transformers {theirs_fp32:.6f} "
                        f"(both fp32): {fp32_rel:.1e} relative apart (tolerance {FP32_EXPORT_TOL:.0e})")
    if diff > tolerance:
        failures.append(f"export: the sidecar scored its best average {sidecar:.6f}, transformers scores the export "
                        f"{theirs:.6f} in {'bf16' if theirs_bf16 is not None else 'fp32'} on the same batches: "
                        f"{diff:.2e} nats apart (tolerance {tolerance:.1e})")
    return {"sidecar_loss": sidecar, "ours_fp32": ours_fp32, "transformers_fp32": theirs_fp32,
            "transformers_bf16": theirs_bf16, "fp32_rel_diff": fp32_rel, "fp32_tolerance": FP32_EXPORT_TOL,
            "bf16_effect": bf16_effect, "sidecar_diff": diff, "tolerance": tolerance, "failures": failures}


def our_held_out_loss(held_out_by_rank, folder: str) -> float:
    """Our own model, in fp32, on the weights of a Hugging Face folder."""
    from averaging.evaluate import single_process_held_out_loss
    from models.hf import read_folder
    from models.registry import build_model

    weights, config = read_folder(folder)
    model = build_model(config).eval()
    model.load_state_dict(weights)
    return single_process_held_out_loss(lambda x: model(x)[0], held_out_by_rank)


def part_correctness(args, work: Path) -> dict[str, Any]:
    import torch

    from averaging.evaluate import hf_held_out_loss
    from averaging.sidecar.protocol import read_eval_log, read_every_val_batches
    from core.files import read_jsonl

    whole, parts = work / "whole", work / "parts"
    deterministic = ["train.deterministic=true"]
    out: dict[str, Any] = {}
    try:
        out["wall_s"] = launch(args, gpu_job(args, whole, *deterministic), work / "whole.log")
    except RuntimeError as e:  # an op with no deterministic algorithm: the other checks still run
        if deterministic_error(e) is None:
            raise
        out["resume"] = {"max_abs_loss_diff": None, "tolerance": RESUME_TOL_NATS,
                         "failure": f"resume: train.deterministic=true stopped the run: {deterministic_error(e)}"}
        shutil.rmtree(whole, ignore_errors=True)
        out["wall_s"] = launch(args, gpu_job(args, whole), work / "whole.log")
    if "resume" not in out:
        launch(args, gpu_job(args, parts, "train.stop_at=6", *deterministic), work / "parts_1.log")
        launch(args, gpu_job(args, parts, *deterministic), work / "parts_2.log")
        out["resume"] = resume_check(losses(whole), losses(parts))

    records = read_eval_log(str(whole))
    best = min((r for r in records if r.get("best")), key=lambda r: r["lawa_val_loss"])
    kinds = sorted(k for k in records[-1] if k.endswith("_val_loss"))
    batches, folder = read_every_val_batches(str(whole)), str(whole / "lawa_best_hf")
    sidecar_bf16 = torch.cuda.is_available() and not args.dry  # inference_config: bf16 on a GPU only
    out["export"] = export_check(best["lawa_val_loss"], our_held_out_loss(batches, folder),
                                 hf_held_out_loss(batches, folder),
                                 hf_held_out_loss(batches, folder, torch.bfloat16) if sidecar_bf16 else None)
    # What the tolerance must resolve: the other averages the sidecar scored at that step.
    others = {k: abs(best[k] - best["lawa_val_loss"]) for k in kinds if k != "lawa_val_loss" and k in best}
    out["export"]["nearest_other_average"] = min(others.items(), key=lambda kv: kv[1]) if others else None
    metrics = read_jsonl(str(whole / "metrics.jsonl"))
    out.update({
        "steps": sorted(losses(whole)), "sidecar_evals": len(records), "sidecar_kinds": kinds,
        "lawa_best_step": best["step"], "best_record": {k: best[k] for k in kinds if k in best},
        "max_mem_gb": max((r.get("max_mem_gb", 0.0) for r in metrics), default=0.0),
        "layout_line": next((line for line in (work / "whole.log").read_text().splitlines() if "layout:" in line), ""),
        "ema_offload_in_host_memory": None if args.dry else ema_offload_in_host_memory(),
    })
    failures = [f for f in [out["resume"]["failure"], *out["export"]["failures"]] if f]
    if not {"raw_val_loss", "lawa_val_loss", "ema_val_loss", "swa_val_loss"} <= set(kinds):
        failures.append(f"sidecar: scored {', '.join(kinds)}; raw, lawa, ema and swa expected")
    if out["ema_offload_in_host_memory"] is False:
        failures.append("ema.offload: the EMA is not in pinned host memory, or differs from its reference")
    out["failures"], out["ok"] = failures, not failures
    return out


def deterministic_error(e: Exception) -> Optional[str]:
    """The line of a failed run's log that names the op with no deterministic algorithm (the
    launcher's one line, launcher.trainer.deterministic_refusal), if there is one."""
    from launcher.trainer import NO_DETERMINISTIC_ALGORITHM

    return next((line.strip() for line in str(e).splitlines() if NO_DETERMINISTIC_ALGORITHM in line), None)


def ema_offload_in_host_memory() -> bool:
    """ema.offload on device weights: the EMA lives in pinned host memory and equals the reference
    (on CPU the two placements cannot be told apart, so only a GPU checks this)."""
    import torch

    from averaging.ema_swa import EmaArgs, ShardAverages, SwaArgs

    weights = [torch.randn(4096, device="cuda")]
    first = weights[0].clone()
    avg = ShardAverages(EmaArgs(enabled=True, half_life=2.0, offload=True), SwaArgs(), weights, 0)
    avg.update(0)
    weights[0].add_(1.0)
    avg.update(1)
    avg.fence()
    weights[0].zero_()  # the next step overwrites the weights: the EMA must hold the values copied
    expected = avg.decay * first + (1 - avg.decay) * (first + 1.0)
    ema = avg.current()["ema"][0]
    return bool(ema.device.type == "cpu" and ema.is_pinned() and torch.allclose(ema, expected.cpu(), atol=1e-6))


# ---------------------------------------------------------------------------------------------
# 2. throughput: the workers (children of this script)


# The recipe's rows and the smoke job's correctness parts read one data dir: the same held-out share.
DATA_AS_SMOKE = "data.val_fraction=0.05"


def throughput_overrides(args, size: tuple[str, int, int], run_dir: Path) -> list[str]:
    model, micro, accum = size
    vocab = 4096 if args.dry else 50304  # GPT-2's padded vocabulary on a GPU: the head is a real share of the work
    return [f"data.dir={args.data}", DATA_AS_SMOKE, f"run_dir={run_dir}", f"model.size={model}", f"model.vocab_size={vocab}",
            f"model.block_size={args.seq}", f"data.seq_len={args.seq}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro * accum}", "train.steps=1000", "schedule.warmup_steps=10",
            "snapshot.every=0", "sidecar.enabled=false", "ema.enabled=false", "swa.enabled=false",
            "train.grad_clip=1.0", *(["train.precision=bf16"] if not args.dry else [])]


def timed(steps, warmup: int, measured: int, device) -> tuple[float, list[float]]:
    """Seconds per step over `measured` steps after `warmup` (device synchronised), and every loss."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    values = []
    for i in range(warmup):
        values.append(steps(i))
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + measured):
        values.append(steps(i))
    sync()
    return (time.perf_counter() - start) / measured, values


def worker_launcher(args) -> dict[str, Any]:
    import torch

    from launcher import trainer
    from launcher.config import load_job
    from models.registry import count_parameters, flops_per_token

    job = load_job(REPO / "jobs/gpt2_125m.yaml", [*args.overrides])
    t = trainer.build(job)
    if t.par.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    per_step, values = timed(lambda i: trainer.train_step(t, i)[0].item(), args.warmup, args.measure, t.par.device)
    linear = torch.nn.functional.linear  # DeepSpeed's own at ZeRO-3, unless compiled (core/engine.py)
    return {**summary(job, t.model_config, per_step, values, t.par.device, count_parameters, flops_per_token),
            "linear": f"{linear.__module__}.{linear.__name__}"}


def worker_reference(args) -> dict[str, Any]:
    """Plain single-device PyTorch: the same model and batches, compiled, bf16 autocast, fused AdamW."""
    import torch

    from launcher.config import load_job
    from launcher.data import ensure_prepared, job_batches
    from launcher.optim import param_groups
    from models.registry import build_model, count_parameters, flops_per_token

    job = load_job(REPO / "jobs/gpt2_125m.yaml", [*args.overrides])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    manifest = ensure_prepared(job.data, True, lambda: None)
    batches = job_batches(job.data, manifest, job.train.seed)
    config = job.model.resolve(batches.vocab_size, job.data.seq_len)
    torch.manual_seed(job.train.seed)
    model = build_model(config).to(device)
    o = job.optimizer
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  fused=cuda)
    compiled = torch.compile(model, backend="inductor" if cuda else "aot_eager")
    accum = job.train.global_batch_size // job.train.micro_batch_size
    dtype = torch.bfloat16 if cuda else torch.float32

    def step(i: int) -> float:
        total = 0.0
        for micro in range(accum):
            x, y = batches.train_batch(i, 0, micro, job.train.micro_batch_size)
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                _, loss = compiled(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (loss / accum).backward()
            total += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (total / accum).item()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_step, values = timed(step, args.warmup, args.measure, device)
    return summary(job, config, per_step, values, device, count_parameters, flops_per_token)


def summary(job, config, per_step: float, values: list[float], device, count_parameters, flops_per_token) -> dict:
    import torch

    tokens = job.train.global_batch_size * job.data.seq_len
    tok_s = tokens / per_step
    return {"params": count_parameters(config), "tokens_per_step": tokens, "step_s": per_step, "tokens_per_s": tok_s,
            "model_tflops": tok_s * flops_per_token(config, job.data.seq_len) / 1e12,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "losses": values}


def run_worker(args, kind: str, overrides: list[str], log: Path) -> dict[str, Any]:
    out = log.with_suffix(".json")
    run_child([sys.executable, str(Path(__file__)), "--worker", kind, "--worker-out", str(out), "--warmup",
               str(args.warmup), "--measure", str(args.measure), "--", *overrides], log, args.deadline)
    return json.loads(out.read_text())


def throughput_items(args, first: bool) -> list[tuple[str, str]]:
    """(size, what) in the order measured: every size's reference and default first (the part runs
    them before LAWA's cost), then each variant at every size; the budget cuts the tail."""
    core = ("reference", "default")
    whats = core if first else [v for v in args.variants if v not in core]
    return [(size, what) for what in whats for size in args.size_table]


def measure_throughput(args, work: Path, items: list[tuple[str, str]], rows: dict[str, dict]) -> dict[str, dict]:
    for size, what in items:
        row = rows.setdefault(size, {})
        base = throughput_overrides(args, args.size_table[size], work / f"tp_{size}_{what}")
        started = time.monotonic()
        try:
            if what == "reference":
                row[what] = run_worker(args, "reference", base, work / f"tp_{size}_reference.log")
            else:
                row[what] = run_worker(args, "launcher", [*base, *args.variants[what]], work / f"tp_{size}_{what}.log")
            row[what]["wall_s"] = time.monotonic() - started  # the process's whole life: start, compile, steps
        except OutOfBudget as e:
            row[what] = {"skipped": str(e)}
        except Exception as e:  # one configuration failing must not hide the others' figures
            row[what] = {"error": str(e).splitlines()[0]}
    return rows


def summarize_throughput(args, rows: dict[str, dict]) -> dict[str, dict]:
    """Each variant's ratio to the reference and its losses against the default's; the best variant
    whose losses match."""
    for row in rows.values():
        default, ref = row.get("default", {}), row.get("reference", {}).get("tokens_per_s")
        for variant in args.variants:
            r = row.get(variant, {})
            if "losses" in r and "losses" in default:
                r["max_rel_loss_diff_vs_default"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], default["losses"]))
            if ref and "tokens_per_s" in r:
                r["ratio_vs_reference"] = r["tokens_per_s"] / ref
        sound = [v for v in args.variants if "tokens_per_s" in row.get(v, {})
                 and row[v].get("max_rel_loss_diff_vs_default", 0) <= args.loss_tol]
        row["best"] = max(sound, key=lambda v: row[v]["tokens_per_s"]) if sound else None
    return rows


# ---------------------------------------------------------------------------------------------
# 3. LAWA's cost


def part_lawa_cost(args, work: Path) -> dict[str, Any]:
    from core.files import read_jsonl

    name, size = next(iter(args.size_table.items()))
    steps, every = (12, 2) if args.dry else (60, 10)
    base = ["--job", "jobs/gpt2_125m.yaml", *throughput_overrides(args, size, work / "unused")]
    base = [a for a in base if not a.startswith(("run_dir=", "train.steps=", "snapshot.every=", "sidecar.enabled="))]
    common = [f"train.steps={steps}", f"logging.every={every}", "eval.every=0", "checkpoint.every=100000"]
    runs = {}
    for mode, extra in (("on", [f"snapshot.every={every}", "sidecar.enabled=true", "lawa.spacing=0",
                                f"snapshot.dir={work / 'cost_snaps'}", "sidecar.poll_seconds=0.2"]),
                        ("off", ["snapshot.every=0", "sidecar.enabled=false"])):
        run_dir = work / f"cost_{mode}"
        launch(args, [*base, f"run_dir={run_dir}", *common, *extra], work / f"cost_{mode}.log")
        windows = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "tokens_per_s" in r][1:]
        runs[mode] = {"tokens_per_s": median([r["tokens_per_s"] for r in windows]),
                      "step_s": median([r["tokens"] / r["step"] / r["tokens_per_s"] for r in windows]),
                      "snapshot_s_per_window": median([r["snapshot_s"] for r in windows if "snapshot_s" in r])}
    stall = runs["on"]["snapshot_s_per_window"]  # one snapshot per window (logging.every == snapshot.every)
    return {"size": name, **runs, "stall_per_snapshot_s": stall,
            "stall_share_at_every_200": stall / (200 * runs["off"]["step_s"]) if stall is not None else None,
            "ratio_on_off": runs["on"]["tokens_per_s"] / runs["off"]["tokens_per_s"]}


# ---------------------------------------------------------------------------------------------
# 4. zero-shot scoring


def part_zero_shot(args, work: Path) -> dict[str, Any]:
    """bench/zero_shot_throughput.py on the device: one (context, continuation) per forward vs batched."""
    out = work / "zero_shot.json"
    size, counts = ("micro", ["--choice", "2", "--last-word", "4"]) if args.dry else \
        ("gpt2-125m", ["--choice", "64", "--last-word", "128"])
    run_child([sys.executable, str(REPO / "bench/zero_shot_throughput.py"), "--size", size, *counts,
               "--device", "cpu" if args.dry else "cuda", "--json", str(out)], work / "zero_shot.log", args.deadline)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# the run


def environment(dry: bool) -> dict[str, Any]:
    import torch

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "dry": dry,
            "command": " ".join([sys.executable, *sys.argv])}
    try:
        from importlib import metadata

        info["deepspeed"] = metadata.version("deepspeed")
        info["transformers"] = metadata.version("transformers")
    except Exception:
        pass
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30)
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


PARTS = ("correctness", "throughput", "lawa_cost", "zero_shot")
# A speed-up whose first steps' losses move more than this (relative) from the default's changes the
# numbers, not just their rounding (bf16 on a GPU: compiled and eager kernels round differently).
VARIANT_LOSS_TOL = {True: 1e-5, False: 5e-3}  # by args.dry


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (the test suite's run)")
    parser.add_argument("--sizes", default="125m,770m", help=f"of {', '.join(GPU_SIZES)} (not in --dry)")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run (a rerun: some of them)")
    parser.add_argument("--variants", default=None, help=f"throughput rows beside the reference, of {', '.join(VARIANTS)}")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="everything ends within this; a measurement still running then is stopped and says so")
    parser.add_argument("--work", default=None, help="scratch folder (default: OUT/work)")
    parser.add_argument("--worker", choices=("launcher", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        from core.distributed import exit_process

        result = {"launcher": worker_launcher, "reference": worker_reference}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        exit_process(0)
    if args.out is None:
        parser.error("--out is required")
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        parser.error(f"--parts: {', '.join(sorted(set(parts) - set(PARTS)))} is not one of {', '.join(PARTS)}")
    all_variants = DRY_VARIANTS if args.dry else VARIANTS
    chosen = args.variants.split(",") if args.variants else list(all_variants)
    if set(chosen) - set(all_variants) or "default" not in chosen:
        parser.error(f"--variants: of {', '.join(all_variants)}, default among them")
    args.variants = {v: all_variants[v] for v in chosen}
    if not args.dry and set(args.sizes.split(",")) - set(GPU_SIZES):
        parser.error(f"--sizes: of {', '.join(GPU_SIZES)}")
    started = time.monotonic()
    args.deadline = started + args.budget_s
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.data = str(work / "data")
    args.seq = 64 if args.dry else 1024
    args.warmup, args.measure = (2, 3) if args.dry else (3, 5)
    args.size_table = DRY_SIZES if args.dry else {s: GPU_SIZES[s] for s in args.sizes.split(",")}
    args.loss_tol = VARIANT_LOSS_TOL[args.dry]

    from core.log import setup_logging
    from launcher.config import load_job
    from launcher.data import prepare

    setup_logging()
    prepare(load_job(REPO / "jobs/gpt2_125m.yaml", [f"data.dir={args.data}", DATA_AS_SMOKE, f"data.seq_len={args.seq}"]).data,
            progress=False)
    res: dict[str, Any] = {"environment": {**environment(args.dry), "budget_s": args.budget_s, "parts": parts}}
    rows: dict[str, dict] = {}
    # In the order of what matters most if the budget runs out. Each step's figures are written as soon
    # as it ends: what a device call stopped at its limit leaves behind still tells.
    steps = {"correctness": lambda: part_correctness(args, work),
             "throughput": lambda: measure_throughput(args, work, throughput_items(args, first=True), rows),
             "lawa_cost": lambda: part_lawa_cost(args, work),
             "throughput_rest": lambda: measure_throughput(args, work, throughput_items(args, first=False), rows),
             "zero_shot": lambda: part_zero_shot(args, work)}
    steps = {name: fn for name, fn in steps.items() if name.removesuffix("_rest") in parts}

    lock = threading.Lock()

    def run_step(name: str) -> None:
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            result = steps[name]()
        except OutOfBudget as e:
            result = {"skipped": str(e)}
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      "traceback": traceback.format_exc()[-4000:]}
        part = name.removesuffix("_rest")
        if part == "throughput" and result is rows:
            result = copy.deepcopy(summarize_throughput(args, rows))
        with lock:
            res[part + "_s"] = res.get(part + "_s", 0.0) + time.monotonic() - t0
            res[part] = result
            write_results(out, res, started)
        print(f"   {name}: {time.monotonic() - t0:.0f} s{' (FAILED)' if 'error' in result else ''}", flush=True)

    if args.dry:
        # On the CPU the figures mean nothing: throughput runs beside the other parts in turn, which
        # halves the suite's wait; on a GPU every step runs alone.
        from concurrent.futures import ThreadPoolExecutor

        lanes = [[n for n in steps if n.startswith("throughput")], [n for n in steps if not n.startswith("throughput")]]
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda lane: [run_step(n) for n in lane], lanes))
    else:
        for name in steps:
            run_step(name)
    text = write_results(out, res, started)
    print(text)
    failed = [p for p in parts if "error" in res.get(p, {})]
    return 1 if failed or ("correctness" in parts and not res["correctness"].get("ok")) else 0


def write_results(out: Path, res: dict[str, Any], started: float) -> str:
    res["total_s"] = time.monotonic() - started
    write_file_atomic(str(out / "gpu_check.json"), json.dumps(res, indent=1))
    text = markdown(res)
    write_file_atomic(str(out / "gpu_check.md"), text)
    return text


if __name__ == "__main__":
    sys.exit(main())
