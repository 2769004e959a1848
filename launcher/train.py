"""Pretraining entry point.

    torchrun --nproc_per_node 2 launcher/train.py --job jobs/smoke.yaml [section.key=value ...]
    deepspeed launcher/train.py --job jobs/gpt2_125m.yaml
    python launcher/train.py            # one process, the embedded tiny CPU job

Reads the job, joins the process group, prepares the data if its shards are missing, builds the
model under `deepspeed.zero.Init`, and trains with periodic validation and checkpoints. A run
directory that already holds a complete checkpoint is resumed from it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import Optional

if __package__ in (None, ""):
    # Run as a script (the deepspeed launcher and torchrun do this): make the repo importable
    # even when the project is not pip-installed.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from averaging import sidecar as lawa_sidecar
from averaging.averages import ShardAverages
from averaging.evaluate import validation_loss
from launcher import checkpoint
from launcher.config import (
    ConfigError,
    JobConfig,
    deepspeed_config,
    dump_yaml,
    learning_rate,
    load_job,
    resolve_model_config,
    resolve_precision,
    validate_layout,
)
from launcher.data import TokenBatches, ensure_prepared
from launcher.distributed import Parallel, barrier, exit_process, init_distributed, rank_env
from launcher.metrics import MetricsLogger
from launcher.optim import build_optimizer, full_numel
from launcher.preemption import Preemption, requeue_slurm_job
from launcher.snapshot import SnapshotWriter, resolve_root
from models.hf import MODEL_FILE
from models.registry import build_model, config_to_dict, count_parameters, flops_per_token
from models.tensor_parallel import tensor_parallel_layout


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def say(par: Parallel, message: str) -> None:
    if par.is_main:
        print(message, flush=True)


def all_reduce_mean(value: float, par: Parallel) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=par.device)
    dist.all_reduce(t, group=par.dp_group)
    return t.item() / par.dp


def train(job: JobConfig) -> dict:
    """Runs the job in this process (one rank of the world); returns the final metrics on every rank."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # chosen, rather than guessed with a warning
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives that newer torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    grad_accum = validate_layout(job, rank_env().world_size)
    try:
        par = init_distributed(job.parallel.tensor)
    except ValueError as e:  # a layout that cannot run on this machine
        raise ConfigError(str(e)) from None
    precision = resolve_precision(job, par.device.type)
    if precision == "bf16" and par.device.type == "cpu":
        say(par, "note: bf16 on CPU trains, but slowly; fp32 is the CPU default")

    run_dir = job.resolved_run_dir
    ckpt_dir = job.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if par.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(job))
    barrier()

    try:
        manifest = ensure_prepared(job.data, par.is_main, barrier)
    except (ValueError, FileNotFoundError) as e:  # the data module's errors name the data.* key
        raise ConfigError(str(e)) from None
    batches = TokenBatches(manifest, job.data.dir, [s.weight for s in job.data.sources], job.data.seq_len,
                           job.train.seed)
    model_config = resolve_model_config(job, batches.vocab_size)

    ds_config = deepspeed_config(job, par.dp, grad_accum, precision)
    if par.is_main:
        with open(os.path.join(run_dir, "deepspeed_config.json"), "w") as f:
            json.dump(ds_config, f, indent=1)
        with open(os.path.join(run_dir, MODEL_FILE), "w") as f:  # what export tools rebuild the model from
            json.dump(config_to_dict(model_config), f, indent=1)

    # The same seed on every rank: the model is identical whatever the layout, and zero.Init
    # partitions it without needing a broadcast to agree.
    torch.manual_seed(job.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=par.dp_group,
                             mpu=par, enabled=job.parallel.zero_stage == 3):
        model = build_model(model_config, par.tp_group)
    n_params = count_parameters(model_config)
    local = sum(full_numel(p) for p in model.parameters())
    per_rank = f" ({local / 1e6:.2f}M per tensor-parallel rank)" if par.tp > 1 else ""
    say(par, f"model: {job.model.size} {model_config.n_layer}L/{model_config.n_embd}d/{model_config.n_head}h, "
             f"vocab {model_config.vocab_size}, {n_params / 1e6:.2f}M parameters{per_rank}")
    say(par, f"layout: world {par.world_size} = tensor {par.tp} × data {par.dp}; {precision}; "
             f"ZeRO stage {job.parallel.zero_stage}; {job.train.global_batch_size} sequences × "
             f"{job.data.seq_len} tokens per step ({grad_accum} accumulation steps of "
             f"{job.train.micro_batch_size} per rank)")

    optimizer = build_optimizer(model, job.optimizer, par.device)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=par)

    step, tokens = 0, 0
    grown_from = None  # what this run was grown from, when it starts as a grown model
    found = checkpoint.complete_checkpoints(ckpt_dir)
    if found and job.checkpoint.resume:
        tag = found[-1][1]
        state = checkpoint.read_run_state(ckpt_dir, tag)
        if (state["dp"], state["tp"]) != (par.dp, par.tp):
            raise ConfigError(f"checkpoint {tag} in {ckpt_dir} was written with data {state['dp']} × tensor "
                              f"{state['tp']}; this run has data {par.dp} × tensor {par.tp}: resume on the same layout")
        checkpoint.load(engine, ckpt_dir, tag)
        step, tokens = state["step"], state["tokens"]
        say(par, f"resumed from {os.path.join(ckpt_dir, tag)} at step {step}")
    elif found:
        raise ConfigError(f"{ckpt_dir} holds checkpoints but checkpoint.resume is false: "
                          f"choose another run_dir or delete them")
    elif job.checkpoint.init_from is not None or job.growth.from_run is not None:
        try:
            if job.growth.from_run is not None:
                grown_from = checkpoint.init_grown(engine, par, job.growth, model_config, lambda m: say(par, m))
            else:
                source = checkpoint.resolve_init_source(job.checkpoint.init_from)
                checkpoint.init_from(engine, par, source, job.checkpoint.init_optimizer, lambda m: say(par, m))
        except ValueError as e:
            raise ConfigError(str(e)) from None

    averages = ShardAverages(job.ema, job.swa, engine.optimizer.fp32_partitioned_groups_flat, job.snapshot.every)
    averages_file = checkpoint.rank_state_file(par.dp_rank, par.tp_rank)
    if step > 0 and averages.enabled:
        saved = checkpoint.load_rank_state(ckpt_dir, tag, averages_file)
        if saved is not None:
            averages.load_state_dict(saved)
        else:
            say(par, f"note: {os.path.join(ckpt_dir, tag)} holds no EMA/SWA state; the averages start afresh")

    if step >= job.train.steps:
        say(par, f"{run_dir} has already trained its {job.train.steps} steps (train.steps); to go on, raise "
                 f"train.steps, or start a new run with run_dir=<another directory>")
        records = lawa_sidecar.read_eval_log(run_dir) if par.is_main else []
        if records:
            print("raw vs LAWA validation loss (eval.jsonl):\n" + lawa_sidecar.format_eval_table(records), flush=True)
        return {}

    tp_layout = tensor_parallel_layout(model)
    metrics = MetricsLogger(run_dir, par.is_main, job.logging.tensorboard)
    if step > 0:
        metrics.log({"event": "resume", "step": step})
    if grown_from is not None:  # the report counts the small run's tokens into this run's budget
        metrics.log({"event": "growth", "step": 0, **grown_from})
    val_set = batches.val_batches(par.dp_rank, par.dp, job.eval.batches, job.train.micro_batch_size)
    snapshots, sidecar = start_lawa(job, engine, par, run_dir, step, model_config, ds_config, precision, val_set,
                                    averages if averages.enabled else None)
    # Byte offset into eval.jsonl: the trainer prints the sidecar's new lines without re-reading.
    eval_offset = os.path.getsize(os.path.join(run_dir, lawa_sidecar.EVAL_FILE)) \
        if par.is_main and os.path.isfile(os.path.join(run_dir, lawa_sidecar.EVAL_FILE)) else 0
    tokens_per_step = job.train.global_batch_size * job.data.seq_len
    flops_per_step = flops_per_token(model_config, job.data.seq_len) * tokens_per_step
    last_stop = job.train.stop_at or job.train.steps
    preemption = Preemption(job.checkpoint.on_signal, par.ctrl_group)
    preempted = False
    result: dict = {}
    window_start, window_steps, window_paused, window_snapshot_s = time.perf_counter(), 0, 0.0, 0.0

    while step < last_stop and not preempted:
        lr = learning_rate(job, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Dropout draws from a stream that depends only on (seed, step, rank): resume is exact.
        torch.manual_seed(job.train.seed * 1_000_003 + step * 1009 + par.rank)
        loss_sum = 0.0
        for micro in range(grad_accum):
            x, y = batches.train_batch(step, par.dp_rank, micro, job.train.micro_batch_size)
            _, loss = engine(x.to(par.device), y.to(par.device))
            engine.backward(loss)
            if snapshots is not None and micro == grad_accum - 1:
                snapshots.fence()  # the update must not overwrite a partition still being copied
            engine.step()
            loss_sum += loss.detach().float()
        step += 1
        tokens += tokens_per_step
        window_steps += 1
        if averages.enabled:
            averages.update(step)
        preempted = preemption.should_stop()
        at_end = step == last_stop or preempted
        if snapshots is not None:
            snap_start = time.perf_counter()
            snapshots.after_step(step, tokens, lr, final=at_end)
            window_snapshot_s += time.perf_counter() - snap_start  # copy, votes, commit, any wait

        if step % job.logging.every == 0 or at_end:
            loss_value = all_reduce_mean((loss_sum / grad_accum).item(), par)
            elapsed = time.perf_counter() - window_start - window_paused
            grad_norm = engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            tok_s = window_steps * tokens_per_step / elapsed
            result = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens, "tokens_per_s": tok_s,
                      "tflops_per_rank": window_steps * flops_per_step / elapsed / par.world_size / 1e12,
                      "grad_norm": grad_norm}
            if par.device.type == "cuda":
                result["max_mem_gb"] = torch.cuda.max_memory_allocated(par.device) / 2**30
            if snapshots is not None:
                result["snapshot_s"] = window_snapshot_s  # the training loop's own cost of snapshots
            norm_text = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
            metrics.log(result, f"step {step}/{job.train.steps} | loss {loss_value:.4f} | lr {lr:.2e} | "
                                f"{tok_s / 1e3:.1f}k tok/s | grad norm {norm_text}")
            if sidecar is not None:
                sidecar.check()
            eval_offset = show_new_evals(run_dir, eval_offset, par.is_main)
            window_start, window_steps, window_paused, window_snapshot_s = time.perf_counter(), 0, 0.0, 0.0

        # Evaluation and checkpoint time is kept out of tokens/s.
        pause_start = time.perf_counter()
        if (job.eval.every and step % job.eval.every == 0) or (at_end and not preempted):
            val_loss = validation_loss(engine, val_set, par.device, par.dp_group, par.dp)
            result = {**result, "val_loss": val_loss}
            metrics.log({"step": step, "tokens": tokens, "val_loss": val_loss},
                        f"step {step} | val loss {val_loss:.4f}")
        if step % job.checkpoint.every == 0 or at_end:
            tag = checkpoint.save(engine, ckpt_dir, step, {"tokens": tokens, "dp": par.dp, "tp": par.tp,
                                                           "tensor_parallel_layout": tp_layout},
                                  job.checkpoint.keep, par.is_main,
                                  (averages_file, averages.state_dict()) if averages.enabled else None)
            say(par, f"saved checkpoint {os.path.join(ckpt_dir, tag)}")
        window_paused += time.perf_counter() - pause_start

    if preempted:
        say(par, f"stopped at step {step} on {preemption.received or 'a signal to another rank'}: "
                 f"checkpoint written; the same command resumes the run")
    elif job.train.stop_at is not None and step < job.train.steps:
        say(par, f"stopped at step {step} (train.stop_at); the same command resumes the run")
    metrics.close()
    if snapshots is not None:
        # A preempted job has a short grace period: the sidecar gets a bounded time to finish, and
        # the requeued job's sidecar evaluates whatever it missed.
        finish_lawa(snapshots, sidecar, par, run_dir, step, eval_offset, finished=step == job.train.steps,
                    wait_s=min(job.sidecar.exit_timeout_s, 60.0) if preempted else job.sidecar.exit_timeout_s)
    if preempted and job.checkpoint.requeue and par.is_main:
        requeue_slurm_job(lambda m: say(par, m))
    return result


def start_lawa(job: JobConfig, engine, par: Parallel, run_dir: str, step: int, model_config, ds_config: dict,
               precision: str, val_set: list, averages: Optional[ShardAverages]):
    """Collective: the snapshot ring buffer, the sidecar's spec and held-out set, and the sidecar."""
    if job.snapshot.every == 0:
        return None, None
    root = resolve_root(job.snapshot, par, run_dir, job.name, count_parameters(model_config))
    snapshots = SnapshotWriter(job.snapshot, engine, par, root, resume_step=step, log=lambda m: say(par, m),
                               averages=averages)
    say(par, f"snapshots: every {job.snapshot.every} steps into a ring of {job.snapshot.slots} slots in {root}")
    # What the sidecar needs, so that it can also be started by hand on this run directory.
    if par.is_main:
        lawa_sidecar.clear_training_done(run_dir)
        lawa_sidecar.write_spec(run_dir, {
            "deepspeed": ds_config, "dp": par.dp, "tp": par.tp,
            "snapshot_dir": os.path.abspath(root), "snapshot_every": job.snapshot.every,
            "lawa": {"k": job.lawa.k, "spacing": job.lawa.spacing or job.snapshot.every},
            "device": job.sidecar.device, "training_device": par.device.type, "precision": precision,
            "poll_seconds": job.sidecar.poll_seconds, "tensorboard": job.logging.tensorboard,
            "export_hf": job.sidecar.export_hf,
            "tasks": [os.path.abspath(t) for t in job.eval.tasks], "task_limit": job.eval.task_limit,
        })
    if par.tp_rank == 0:
        lawa_sidecar.write_val_batches(run_dir, par.dp_rank, val_set)
    barrier()
    sidecar = None
    if job.sidecar.enabled:
        env = rank_env()
        sidecar = lawa_sidecar.SidecarSupervisor(job.sidecar, run_dir, par.rank, par.world_size, par.local_rank,
                                                 env.master_addr, env.master_port, par.ctrl_group,
                                                 log=lambda m: say(par, m))
    return snapshots, sidecar


def show_new_evals(run_dir: str, offset: int, is_main: bool) -> int:
    if not is_main:
        return offset
    records, offset = lawa_sidecar.read_new_eval_records(run_dir, offset)
    for record in records:
        print(lawa_sidecar.format_eval_line(record), flush=True)
    return offset


def finish_lawa(snapshots: SnapshotWriter, sidecar, par: Parallel, run_dir: str, step: int, eval_offset: int,
                finished: bool, wait_s: float) -> None:
    """Collective: commit the last snapshot, let the sidecar evaluate it, and show the results."""
    snapshots.finish()
    if par.is_main:
        lawa_sidecar.mark_training_done(run_dir, snapshots.last_committed, step)
    if sidecar is not None:
        say(par, "waiting for the sidecar to evaluate the last snapshot ...")
        sidecar.wait(wait_s)
    barrier()
    if par.is_main:
        show_new_evals(run_dir, eval_offset, True)
        records = lawa_sidecar.read_eval_log(run_dir)
        if records:
            print("\nraw vs LAWA validation loss (eval.jsonl):\n" + lawa_sidecar.format_eval_table(records), flush=True)
    if finished:
        snapshots.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    is_main = rank_env().rank == 0
    try:
        job = load_job(args.job, args.overrides)
        train(job)
    except ConfigError as e:
        if is_main:
            print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    exit_process(main())
