"""The GPU check, prepared to run in one go when a session is lent a GPU: every CUDA path of the
launcher, its throughput against plain compiled PyTorch, and what online LAWA costs.

    python bench/gpu_check.py --out OUT                 # one GPU, about 8 minutes (--budget-s)
    python bench/gpu_check.py --dry --out OUT           # CPU, tiny sizes: what the test suite runs

One command, one process tree; every measurement runs in a child process (its own memory peak, its
own compile caches). OUT/gpu_check.json holds every figure with the device, versions and date;
OUT/gpu_check.md the tables. A part that fails records its error and the rest still run.

1. correctness: the smoke job on one device (NCCL, bf16 on a GPU), snapshots and the sidecar on the
   same device, EMA and SWA; a run stopped at step 6 and resumed has the uninterrupted run's losses
   (not in --dry: the suite's resume tests check it on CPU);
   the sidecar's best average, exported to Hugging Face, is scored by transformers as it logged.
2. throughput, at seq 1024 (dry: 64), per model size: the launcher's training step (default, and
   each ZeRO stage and speed-up: torch.compile (whole model at ZeRO-1/2, each block as one graph at
   ZeRO-3), ZeRO-3 buckets sized from the model, activation checkpointing) against a plain
   single-device PyTorch loop of the same model
   (torch.compile, SDPA, fused AdamW, bf16 autocast), same tokens per optimizer step; tokens/s,
   model TFLOP/s (6N + 12·L·d·T per token), peak memory, the ratio, and each variant's losses
   against the default's (a speed-up that changes the numbers beyond rounding is not one).
3. LAWA's cost at the smallest size: the loop's stall per snapshot (and as a share of training time
   at snapshot.every=200), and tokens/s with snapshots + sidecar on vs off.
4. zero-shot scoring (bench/zero_shot_throughput.py): examples/s one sequence per forward vs batched,
   gpt2-125m shape (dry: micro, on the CPU), and that both give the same metrics.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from common import REPO, child_env, median

# (size, micro batch, accumulation steps) at seq 1024: 64 sequences (65k tokens) per optimizer step,
# 1/8 of the GPT-2 recipes' 512, on one GPU.
GPU_SIZES = {"125m": ("gpt2-125m", 16, 4), "350m": ("gpt2-350m", 16, 4), "770m": ("gpt2-770m", 8, 8)}
DRY_SIZES = {"micro": ("micro", 2, 2)}
# The launcher's configurations, in the order they are measured (the budget may cut the tail): the
# default (parallel.zero_stage auto: on one GPU the lowest stage, 1), compiled (the whole model at
# ZeRO-1/2, each block as one graph at ZeRO-3), the other stages, ZeRO-3's model-sized buckets,
# activation checkpointing. Every one's losses are held to the default's.
VARIANTS = {"default": [], "compile": ["train.compile=inductor"], "zero3": ["parallel.zero_stage=3"],
            "zero3_compile": ["parallel.zero_stage=3", "train.compile=inductor"], "zero2": ["parallel.zero_stage=2"],
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


def launch(args, train_args: list[str], log: Path, timeout: float = 600) -> float:
    """launcher/train.py on one device through torchrun, as a user starts it; returns its wall time."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1",
           "launcher/train.py", *train_args]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def losses(run_dir: Path) -> dict[int, float]:
    from core.files import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "loss" in r}


def max_rel(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in b)


# ---------------------------------------------------------------------------------------------
# 1. correctness


def part_correctness(args, work: Path) -> dict[str, Any]:
    whole, parts = work / "whole", work / "parts"
    wall = launch(args, gpu_job(args, whole), work / "whole.log")
    resumed_rel = None
    if not args.dry:  # on CPU the suite's own resume tests check this (tests/test_train_distributed.py)
        launch(args, gpu_job(args, parts, "train.stop_at=6"), work / "parts_1.log")
        launch(args, gpu_job(args, parts), work / "parts_2.log")
        resumed_rel = max_rel(losses(parts), losses(whole))
    from averaging.evaluate import hf_held_out_loss
    from averaging.sidecar.protocol import read_eval_log, read_every_val_batches

    records = read_eval_log(str(whole))
    best = min((r for r in records if r.get("best")), key=lambda r: r["lawa_val_loss"])
    hf = hf_held_out_loss(read_every_val_batches(str(whole)), str(whole / "lawa_best_hf"))
    from core.files import read_jsonl

    metrics = read_jsonl(str(whole / "metrics.jsonl"))
    out = {
        "wall_s": wall, "steps": sorted(losses(whole)), "resumed_max_rel_loss_diff": resumed_rel,
        "sidecar_evals": len(records), "sidecar_kinds": sorted(k for k in records[-1] if k.endswith("_val_loss")),
        "lawa_best_step": best["step"], "lawa_best_loss": best["lawa_val_loss"], "transformers_loss": hf,
        "hf_rel_diff": abs(hf - best["lawa_val_loss"]) / best["lawa_val_loss"],
        "max_mem_gb": max((r.get("max_mem_gb", 0.0) for r in metrics), default=0.0),
        "layout_line": next((line for line in (work / "whole.log").read_text().splitlines() if "layout:" in line), ""),
        "ema_offload_in_host_memory": None if args.dry else ema_offload_in_host_memory(),
    }
    # bf16 on a GPU: kernels that accumulate with atomics (the embedding's backward) are not bitwise
    # repeatable, and the sidecar scores in bf16 while transformers scores in fp32.
    tol_resume, tol_hf = (1e-6, 1e-4) if args.dry else (2e-2, 2e-2)
    out["ok"] = (resumed_rel is None or resumed_rel <= tol_resume) and out["hf_rel_diff"] <= tol_hf and \
        {"raw_val_loss", "lawa_val_loss", "ema_val_loss", "swa_val_loss"} <= set(out["sidecar_kinds"]) and \
        out["ema_offload_in_host_memory"] is not False
    return out


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


def throughput_overrides(args, size: tuple[str, int, int], run_dir: Path) -> list[str]:
    model, micro, accum = size
    vocab = 4096 if args.dry else 50304  # GPT-2's padded vocabulary on a GPU: the head is a real share of the work
    return [f"data.dir={args.data}", f"run_dir={run_dir}", f"model.size={model}", f"model.vocab_size={vocab}",
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
    return summary(job, t.model_config, per_step, values, t.par.device, count_parameters, flops_per_token)


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
    cmd = [sys.executable, str(Path(__file__)), "--worker", kind, "--worker-out", str(out),
           "--warmup", str(args.warmup), "--measure", str(args.measure), "--", *overrides]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    return json.loads(out.read_text())


def part_throughput(args, work: Path, deadline: float) -> dict[str, Any]:
    results = {}
    for name, size in args.size_table.items():
        if time.monotonic() > deadline:
            results[name] = {"skipped": "out of the time budget"}
            continue
        row: dict[str, Any] = {}
        base = throughput_overrides(args, size, work / f"tp_{name}")  # each variant: its own run_dir below
        try:
            row["reference"] = run_worker(args, "reference", base, work / f"tp_{name}_reference.log")
        except Exception as e:  # the reference failing must not hide the launcher's figures
            row["reference"] = {"error": str(e).splitlines()[0]}
        for variant, extra in args.variants.items():
            if time.monotonic() > deadline:
                row[variant] = {"skipped": "out of the time budget"}
                continue
            try:
                row[variant] = run_worker(args, "launcher", [*base, f"run_dir={work / f'tp_{name}_{variant}'}", *extra],
                                          work / f"tp_{name}_{variant}.log")
            except Exception as e:
                row[variant] = {"error": str(e).splitlines()[0]}
        default = row.get("default", {})
        for variant in args.variants:
            r = row.get(variant, {})
            if "losses" in r and "losses" in default:
                r["max_rel_loss_diff_vs_default"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], default["losses"]))
        ref = row["reference"].get("tokens_per_s")
        for variant in args.variants:
            if ref and "tokens_per_s" in row.get(variant, {}):
                row[variant]["ratio_vs_reference"] = row[variant]["tokens_per_s"] / ref
        sound = [v for v in args.variants if "tokens_per_s" in row.get(v, {})
                 and row[v].get("max_rel_loss_diff_vs_default", 0) <= args.loss_tol]
        row["best"] = max(sound, key=lambda v: row[v]["tokens_per_s"]) if sound else None
        results[name] = row
    return results


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
    proc = subprocess.run([sys.executable, str(REPO / "bench/zero_shot_throughput.py"), "--size", size, *counts,
                           "--device", "cpu" if args.dry else "cuda", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"zero_shot_throughput exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------
# report


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


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = [f"# GPU check — {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}, "
             f"Python {env['python']}{' — DRY RUN on CPU, tiny sizes: no figure here is a GPU figure' if env['dry'] else ''}",
             "", f"`{env['command']}`", "", "## 1. Correctness", ""]
    c = res["correctness"]
    if "error" in c:
        lines.append(f"FAILED: {c['error']}")
    else:
        lines += ["| check | value | ok |", "|---|---|---|",
                  "| stop at step 6 + resume vs uninterrupted, max rel loss diff | "
                  + ("not run (dry)" if c["resumed_max_rel_loss_diff"] is None else f"{c['resumed_max_rel_loss_diff']:.2e}")
                  + " | |",
                  f"| sidecar evaluations (kinds) | {c['sidecar_evals']} ({', '.join(c['sidecar_kinds'])}) | |",
                  f"| best LAWA (step {c['lawa_best_step']}): sidecar vs transformers | {c['lawa_best_loss']:.4f} vs "
                  f"{c['transformers_loss']:.4f} (rel {c['hf_rel_diff']:.1e}) | |",
                  f"| peak memory | {c['max_mem_gb']:.2f} GB | |",
                  f"| all | | {'yes' if c['ok'] else 'NO'} |"]
    lines += ["", "## 2. Throughput (one device; tokens per optimizer step as given)", "",
              "| size | what | tokens/step | tokens/s | model TFLOP/s | peak GB | vs reference | loss diff vs default |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, row in res["throughput"].items():
        if "skipped" in row:
            lines.append(f"| {size} | skipped: {row['skipped']} | | | | | | |")
            continue
        for what, r in row.items():
            if what == "best":
                continue
            if "tokens_per_s" not in r:
                lines.append(f"| {size} | {what} | {r.get('error') or r.get('skipped')} | | | | | |")
                continue
            mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "–"
            ratio = f"{r['ratio_vs_reference']:.3f}" if "ratio_vs_reference" in r else "–"
            diff = f"{r['max_rel_loss_diff_vs_default']:.1e}" if "max_rel_loss_diff_vs_default" in r else "–"
            lines.append(f"| {size} | {what} | {r['tokens_per_step']} | {r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} "
                         f"| {mem} | {ratio} | {diff} |")
        lines.append(f"| {size} | **best launcher variant** | {row.get('best')} | | | | | |")
    lc = res["lawa_cost"]
    lines += ["", "## 3. LAWA's cost", ""]
    if "error" in lc:
        lines.append(f"FAILED: {lc['error']}")
    else:
        share = lc["stall_share_at_every_200"]
        lines += ["| figure | value |", "|---|---:|",
                  f"| tokens/s, snapshots + sidecar on / off ({lc['size']}) | {lc['on']['tokens_per_s']:,.0f} / "
                  f"{lc['off']['tokens_per_s']:,.0f} = {lc['ratio_on_off']:.3f} |",
                  f"| loop stall per snapshot | {lc['stall_per_snapshot_s'] * 1e3:.2f} ms |",
                  f"| stall share of training time at snapshot.every=200 | {share:.4%} |" if share is not None else ""]
    zs = res.get("zero_shot", {})
    if "error" in zs:
        lines += ["", f"zero-shot: FAILED {zs['error']}"]
    elif zs:
        lines += ["", f"zero-shot scoring, {zs['size']} on {zs['device']} (examples/s):", "",
                  "| task | one per forward | batched | ratio | metrics equal |", "|---|---|---|---|---|"]
        lines += [f"| {task} | {r['examples'] / r['before_s']:.2f} | {r['examples'] / r['after_s']:.2f} | "
                  f"{r['ratio']:.1f}x | {r['metrics_equal']} |"
                  for task, r in zs.items() if isinstance(r, dict)]
    lines += ["", f"total {res['total_s']:.0f} s"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes (the test suite's run)")
    parser.add_argument("--sizes", default="125m,770m", help=f"of {', '.join(GPU_SIZES)} (not in --dry)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this")
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
    started = time.monotonic()
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    args.data = str(work / "data")
    args.seq = 64 if args.dry else 1024
    args.warmup, args.measure = (2, 3) if args.dry else (3, 5)
    args.size_table = DRY_SIZES if args.dry else {s: GPU_SIZES[s] for s in args.sizes.split(",")}
    args.variants = DRY_VARIANTS if args.dry else VARIANTS
    args.loss_tol = 1e-5 if args.dry else 2e-2  # bf16 kernels differ in the last bits between compiled and not
    deadline = started + args.budget_s

    from core.log import setup_logging
    from launcher.config import load_job
    from launcher.data import prepare

    setup_logging()
    prepare(load_job(REPO / "jobs/gpt2_125m.yaml", [f"data.dir={args.data}", f"data.seq_len={args.seq}"]).data,
            progress=False)
    res: dict[str, Any] = {"environment": environment(args.dry)}
    # In order of what matters most if the budget runs out: throughput stops starting new measurements.
    parts = {"correctness": lambda: part_correctness(args, work), "lawa_cost": lambda: part_lawa_cost(args, work),
             "zero_shot": lambda: part_zero_shot(args, work),
             "throughput": lambda: part_throughput(args, work, deadline)}

    def run_part(part: str) -> tuple[dict[str, Any], float]:
        t0 = time.monotonic()
        print(f"== {part}", flush=True)
        try:
            result = parts[part]()
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      "traceback": traceback.format_exc()[-4000:]}
        took = time.monotonic() - t0
        print(f"   {part}: {took:.0f} s{' (FAILED)' if 'error' in result else ''}", flush=True)
        return result, took

    if args.dry:
        # On the CPU the figures mean nothing: the parts run in two lanes at once (the longest, throughput,
        # beside the other three in turn), which halves the suite's wait; on a GPU they run one by one.
        from concurrent.futures import ThreadPoolExecutor

        order = ["throughput", "correctness", "lawa_cost", "zero_shot"]
        with ThreadPoolExecutor(max_workers=2) as pool:
            done = dict(zip(order, pool.map(run_part, order)))
    else:
        done = {part: run_part(part) for part in parts}
    for part in parts:
        res[part], res[part + "_s"] = done[part]
    res["total_s"] = time.monotonic() - started
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out / "gpu_check.md").write_text(text)
    print(text)
    failed = [p for p in ("correctness", "throughput", "lawa_cost", "zero_shot") if "error" in res[p]]
    bad = failed or not res["correctness"].get("ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
