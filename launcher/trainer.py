"""The training loop, and what it is built from.

`build` (collective) reads the job into a running setup: process groups, prepared data, the model
under `deepspeed.zero.Init` inside a DeepSpeed engine. `train` is the loop: restore (resume, or
initial weights from elsewhere), then steps with periodic validation, checkpoints and LAWA
snapshots, until the end, a stop step, or a preemption signal.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from averaging.ema_swa import ShardAverages
from averaging.evaluate import HeldOut, validation_loss
from averaging.sidecar import protocol
from averaging.sidecar.supervisor import SidecarSupervisor
from core.config import ConfigError, dump_yaml
from core.deepspeed_compat import full_numel, master_flat_groups, zero_stage
from core.distributed import Parallel, barrier, gather_objects, init_distributed, node_figures, rank_env, vote
from core.engine import build_engine, deepspeed_config
from core.files import write_file_atomic, write_json_atomic
from core.log import logger, rank_span, setup_logging
from core.orphans import leave_if_orphaned
from core.run_dir import RunDir
from core.run_lock import Locked, RunLock
from core.tokenizer import load_tokenizer
from core.watchdog import PeerWatchdog, lost_peer_message
from core.zero_checkpoint import RunState
from launcher import checkpoint
from launcher.config import JobConfig
from launcher.data import Prefetcher, TokenBatches, describe_mixture, ensure_prepared, job_batches
from launcher.metrics import MetricsLogger
from launcher.optim import build_optimizer
from launcher.plan import choose_stage, cluster_at_start, data_lines, model_shape, plan, refuse_unfit_ring, ring_bytes
from launcher.preemption import Preemption, requeue_slurm_job
from launcher.report import end_of_run_report
from launcher.ring import Ring, open_ring
from launcher.snapshot import SnapshotWriter
from launcher.start import Start, restore
from models.registry import ModelConfig, build_model, count_parameters, flops_per_token, write_model_config
from models.tensor_parallel import tensor_parallel_layout


@dataclass
class Training:
    """A job, built: what the loop (and the benchmarks, which time its parts) work with."""

    job: JobConfig  # as resolved at start (parallel.zero_stage: the stage chosen)
    par: Parallel
    run: RunDir
    engine: Any  # deepspeed.DeepSpeedEngine
    batches: TokenBatches
    model_config: ModelConfig
    ds_config: dict[str, Any]
    precision: str
    grad_accum: int
    prefetcher: Optional[Prefetcher] = None
    ring: Optional[Ring] = None  # the LAWA snapshot ring (None: no snapshots)
    lock: Optional[RunLock] = None  # rank 0's hold on the run directory

    @property
    def checkpoint_dir(self) -> str:
        return self.job.checkpoint.dir or self.run.checkpoints

    def close(self) -> None:
        """Lets go of the ring and the run directory (at the end of the run, or when it fails)."""
        if self.ring is not None:
            self.ring.close()
        if self.lock is not None:
            self.lock.release()


def hold_run_dir(run: RunDir, par: Parallel, name: str) -> Optional[RunLock]:
    """Collective: rank 0 holds the run directory for the run's life (core/run_lock.py); a live run
    holding it is one line on every rank, nothing touched."""
    lock, problem = None, None
    if par.is_main:
        lock = RunLock(run.path, what=name)
        try:
            took_over = lock.acquire()
            if took_over:
                logger.warning(took_over)
        except Locked as e:
            lock, problem = None, f"run_dir {e}"
    problems = [p for p in gather_objects(problem, par.ctrl_group) if p is not None]
    if problems:
        raise ConfigError(problems[0])
    return lock


def build(job: JobConfig) -> Training:
    """Collective: join the process group, hold the run directory, read the prepared data, resolve
    the ZeRO stage and the snapshot ring, print the plan, build the model and engine. The layout is
    checked against the world before any process group is joined."""
    env = rank_env()
    grad_accum = job.train.accumulation_steps(job.parallel.data_parallel(env.world_size))
    if job.train.deterministic:
        use_deterministic_algorithms()
    par = init_distributed(job.parallel.tensor, env)
    setup_logging(par.rank)
    precision = job.train.resolved_precision(par.device.type)
    if precision == "bf16" and par.device.type == "cpu":
        logger.info("note: bf16 on CPU trains, but slowly; fp32 is the CPU default")
    run = RunDir(job.resolved_run_dir)
    if par.is_main:
        os.makedirs(run.path, exist_ok=True)
    lock = hold_run_dir(run, par, job.name)
    ring = None
    try:
        if par.is_main and run.read_run_id() is None:
            write_file_atomic(run.run_id, uuid.uuid4().hex + "\n")
        barrier()
        try:
            manifest = ensure_prepared(job.data, par.is_main, barrier, par.world_size)
            batches = job_batches(job.data, manifest, job.train.seed)
        except (ValueError, FileNotFoundError) as e:  # the data module's errors name the data.* key
            raise ConfigError(str(e)) from None
        if len(batches.names) > 1:
            logger.info(describe_mixture(batches.names, batches.probs.tolist(), job.data.mixture))
        logger.info("\n".join(data_lines(job, manifest)))
        model_config = job.model.resolve(batches.vocab_size, job.data.seq_len, job.parallel.tensor)
        # What the job needs of this machine (launcher/plan.py: arithmetic), printed once as one block, with
        # the machine's figures and the ring's room; a ring that cannot fit is refused here, not at every snapshot.
        shape = model_shape(model_config)
        cl = cluster_at_start(par, *node_figures(par))
        continues = checkpoint.continued_stage(job.checkpoint.dir or run.checkpoints, job.checkpoint.resume,
                                               job.checkpoint.branch_from)
        job, why = choose_stage(job, shape, cl, continues)
        if job.snapshot.every > 0:
            ring = open_ring(job.snapshot, par, run.path, job.name, ring_bytes(job, shape, cl))
            cl = replace(cl, ring_room=ring.room, ring_place=ring.root, ring_shared=ring.shared)
        planned = plan(job, model_config, cl, shape, (job, why))
        logger.info("\n".join(planned.lines()))
        if ring is not None:
            refuse_unfit_ring(planned, ring.root, named=bool(job.snapshot.dir))
        ds_config = deepspeed_config(job.train.micro_batch_size, grad_accum, par.dp, job.train.grad_clip,
                                     planned.zero_stage, bf16=precision == "bf16",
                                     hidden_size=model_config.n_embd if job.parallel.zero_buckets == "auto" else None,
                                     compiled=job.train.compile is not None)
        if par.is_main:
            write_file_atomic(run.config, dump_yaml(job))  # as resolved: the ZeRO stage chosen, not `auto`
            write_json_atomic(run.deepspeed_config, ds_config)
            write_model_config(run.model, model_config)
            # The run keeps its own copy of the tokenizer: export and zero-shot tools need nothing else.
            load_tokenizer(os.path.join(job.data.dir, manifest["tokenizer"]["file"])).save(
                run.tokenizer, max_length=model_config.block_size)

        # The same seed on every rank: the model is identical whatever the layout, and zero.Init
        # partitions it without needing a broadcast to agree.
        torch.manual_seed(job.train.seed)
        engine = build_engine(lambda: build_model(model_config, par.tp_group), ds_config, par,
                              lambda model: build_optimizer(model, job.optimizer, par.device), job.train.compile)
    except BaseException:
        Training(job, par, run, None, None, None, {}, precision, grad_accum, ring=ring, lock=lock).close()
        raise
    engine.module.checkpoint_blocks = job.train.activation_checkpointing
    prefetcher = Prefetcher(batches, par.dp_rank, grad_accum, job.train.micro_batch_size,
                            pin=par.device.type == "cuda") if job.data.prefetch else None
    local = sum(full_numel(p) for p in engine.module.parameters())
    per_rank = f" ({local / 1e6:.2f}M per tensor-parallel rank)" if par.tp > 1 else ""
    logger.info(f"model: {job.model.size} {model_config.n_layer}L/{model_config.n_embd}d/{model_config.n_head}h, "
                f"vocab {model_config.vocab_size}, {count_parameters(model_config) / 1e6:.2f}M parameters{per_rank}")
    logger.info(f"layout: world {par.world_size} = tensor {par.tp} × data {par.dp}{placement(par)}; {precision}; "
                f"ZeRO stage {planned.zero_stage} ({planned.stage_reason}); {job.train.global_batch_size} sequences × "
                f"{job.data.seq_len} tokens per step ({grad_accum} accumulation steps of "
                f"{job.train.micro_batch_size} per rank)")
    return Training(job, par, run, engine, batches, model_config, ds_config, precision, grad_accum, prefetcher,
                    ring, lock)


NO_DETERMINISTIC_ALGORITHM = "does not have a deterministic implementation"  # torch's words, kept in our line


def deterministic_refusal(e: Exception) -> Optional[str]:
    """The one line for an op that torch's deterministic mode refuses (its own message is a paragraph)."""
    text = str(e)
    if not isinstance(e, RuntimeError) or NO_DETERMINISTIC_ALGORITHM not in text:
        return None
    return f"train.deterministic: {text.split(', but you set', 1)[0]} on this device; set train.deterministic=false"


def use_deterministic_algorithms() -> None:
    """Before the device is touched: cuBLAS reads its workspace setting when it first starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # strict: with warn_only, flash attention's backward is not
    torch.backends.cudnn.benchmark = False


def placement(par: Parallel) -> str:
    """' on 2 nodes (node1: ranks 0-1, node2: ranks 2-3)', shortened for big clusters; '' on one node."""
    hosts = list(dict.fromkeys(par.hosts))
    if len(hosts) == 1:
        return ""
    if len(hosts) > 4:
        return f" on {len(hosts)} nodes ({hosts[0]}, ..., {hosts[-1]})"
    return f" on {len(hosts)} nodes (" + ", ".join(
        f"{h}: {rank_span(par.ranks_on(h))}" for h in hosts) + ")"


def train_step(t: Training, step: int, *copying) -> tuple[torch.Tensor, float]:
    """One optimizer step (0-based index `step`): (this rank's mean loss over its micro-batches, lr).
    `copying`: whatever may still be copying the master weights off the device (a SnapshotWriter,
    ShardAverages): the update waits for it on the device (its `fence`)."""
    job, par, engine = t.job, t.par, t.engine
    lr = job.learning_rate(step)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    # Dropout draws from a stream that depends only on (seed, step, rank): resume is exact.
    torch.manual_seed(job.train.seed * 1_000_003 + step * 1009 + par.rank)
    loss_sum = torch.zeros((), device=par.device)
    micro_batches = t.prefetcher.get(step) if t.prefetcher is not None else \
        [t.batches.train_batch(step, par.dp_rank, m, job.train.micro_batch_size) for m in range(t.grad_accum)]
    for micro, (x, y) in enumerate(micro_batches):
        _, loss = engine(x.to(par.device, non_blocking=True), y.to(par.device, non_blocking=True))
        engine.backward(loss)
        if micro == t.grad_accum - 1:
            for reader in copying:
                reader.fence()  # the update must not overwrite a partition still being copied
        engine.step()
        loss_sum += loss.detach().float()
    return loss_sum / t.grad_accum, lr


def all_reduce_mean(value: torch.Tensor, par: Parallel) -> float:
    total = value.detach().to(torch.float64).reshape(1)
    dist.all_reduce(total, group=par.dp_group)
    return total.item() / par.dp


class Window:
    """What happened between two log steps: steps, time in training vs in pauses, snapshot costs."""

    def __init__(self):
        self.start, self.steps, self.paused = time.perf_counter(), 0, 0.0
        self.snapshot_s, self.snapshot_wait_s, self.snapshots_skipped = 0.0, 0.0, 0

    def add_snapshot(self, seconds: float, stats: dict[str, Any]) -> None:
        self.snapshot_s += seconds  # the loop's whole time in snapshots: copy, votes, commit, waits
        self.snapshot_wait_s += stats.get("snapshot_wait_s", 0.0)
        self.snapshots_skipped += "snapshot_skipped" in stats

    @property
    def compute_s(self) -> float:
        return time.perf_counter() - self.start - self.paused


def run_job(make_job: Callable[[], JobConfig]) -> int:
    """Train the job `make_job` builds; a config error is one line from rank 0 and exit status 2."""
    is_main = rank_env().rank == 0
    try:
        train(make_job())
    except ConfigError as e:
        if is_main:
            print(f"config error: {e}", file=sys.stderr, flush=True)
        else:  # every rank finds the same mistake: give rank 0 time to say it before torchrun stops it
            time.sleep(3)
        return 2
    return 0


def train(job: JobConfig) -> dict:
    """Runs the job in this process (one rank of the world); returns the last logged metrics. A
    peer lost on the way (its node died, or vanished) ends the process with one line and exit
    code 75 (core/watchdog.py)."""
    t = build(job)
    env = rank_env()
    watchdog = PeerWatchdog(t.par, job.parallel.heartbeat_timeout_s, env.master_addr, env.master_port)
    try:
        result = run_training(t)
    except Exception as e:  # a lost peer and an op torch cannot run deterministically are one line; others go up
        leave_if_orphaned()  # whatever failed, a killed launcher is the cause to report
        refusal = deterministic_refusal(e) if job.train.deterministic else None
        if refusal is not None:
            watchdog.stop()
            raise ConfigError(refusal) from None
        message = lost_peer_message(e, t.par)
        if message is None:
            raise
        watchdog.fail(message)
    finally:
        t.close()
    watchdog.stop()
    barrier(t.par.ctrl_group)  # nobody leaves (and takes a store away) while another still watches
    return result


def run_training(t: Training) -> dict:
    """The loop of one launch: restore, then steps until the end, a stop step or a signal; returns
    the last logged metrics."""
    job = t.job
    averages = ShardAverages(job.ema, job.swa, master_flat_groups(t.engine), job.snapshot.every)
    start = restore(t.engine, t.par, t.checkpoint_dir, job.checkpoint, job.growth, t.model_config, averages,
                    t.ring if t.ring is not None and t.ring.restarts else None, t.run.path)
    if start.step >= job.train.steps:
        logger.info(f"{t.run.path} has already trained its {job.train.steps} steps (train.steps); to go on, raise "
                    f"train.steps, or start a new run with run_dir=<another directory>")
        show_eval_table(t.run.path, t.par.is_main)
        return {}
    loop = Loop(t, start, averages)
    while not loop.over:
        loss, lr = loop.step()
        if loop.step_no % job.logging.every == 0 or loop.at_end:
            loop.log_window(loss, lr)
        loop.evaluate_and_checkpoint()
    return loop.finish()


class Loop:
    """One launch's steps and what runs beside them: metrics, the held-out set, the LAWA ring and
    its sidecar, the preemption vote, and the window of steps being timed."""

    def __init__(self, t: Training, start: Start, averages: ShardAverages):
        job, par, run = t.job, t.par, t.run
        self.t, self.averages = t, averages
        self.step_no, self.tokens = start.step, start.tokens
        self.last_stop = job.train.stop_at or job.train.steps
        self.tp_layout = tensor_parallel_layout(t.engine.module)
        self.metrics = MetricsLogger(run.path, par.is_main, job.logging, job.name, dataclasses.asdict(job))
        if start.step > 0:
            self.metrics.log({"event": "resume", "step": start.step})
        if start.grown_from is not None:  # the report counts the small run's tokens into this run's budget
            self.metrics.log({"event": "growth", "step": 0, **start.grown_from})
        self.val_set = held_out_set(t)
        if len(t.batches.names) > 1:  # the mixture this run samples, for the law fits (launcher/mixture.py)
            self.metrics.log({"event": "mixture", "step": start.step, "mixture": job.data.mixture,
                              "weights": dict(zip(t.batches.names, t.batches.probs.tolist()))})
        self.snapshots, self.sidecar = start_lawa(t, start.step, self.val_set, averages if averages.enabled else None)
        self.evals = protocol.follow_eval_log(run.path)  # the trainer prints the sidecar's lines as they come
        self.flops_per_step = flops_per_token(t.model_config, job.data.seq_len) * job.tokens_per_step
        self.preemption = Preemption(job.checkpoint.on_signal)
        self.preempted = False
        self.result: dict = {}
        self.window = Window()

    @property
    def at_end(self) -> bool:
        return self.step_no == self.last_stop or self.preempted

    @property
    def over(self) -> bool:
        return self.step_no >= self.last_stop or self.preempted

    def step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step, then the averages, the preemption vote and the snapshot that follow it."""
        loss, lr = train_step(self.t, self.step_no, *(p for p in (self.snapshots, self.averages) if p is not None))
        self.step_no += 1
        self.tokens += self.t.job.tokens_per_step
        self.window.steps += 1
        if self.averages.enabled:
            self.averages.update(self.step_no)
        if self.vote_due():
            self.vote()
        if self.snapshots is not None:
            snap_start = time.perf_counter()
            stats = self.snapshots.after_step(self.step_no, self.tokens, lr, final=self.at_end)
            self.window.add_snapshot(time.perf_counter() - snap_start, stats)
        return loss, lr

    def vote_due(self) -> bool:
        step = self.step_no
        return step % self.t.job.train.vote_every == 0 or step == self.last_stop or \
            (self.snapshots is not None and (self.snapshots.due(step) or self.snapshots.restart_pending))

    def vote(self) -> None:
        """Collective: the trainers' one vote of their own, one small all-reduce of every flag at once
        (a warning signal, the sidecar's liveness, the snapshot writes): not every step, so that a
        steady-state step runs DeepSpeed's collectives only."""
        signal = self.preemption.ballot()
        alive = self.sidecar.ballot() if self.sidecar is not None else []
        writes = self.snapshots.ballot() if self.snapshots is not None else []
        result = vote(signal + alive + writes, self.t.par.ctrl_group)
        self.preempted = Preemption.stop(result[:len(signal)])
        if self.sidecar is not None:
            self.sidecar.after_vote(result[len(signal):len(signal) + len(alive)])
        if self.snapshots is not None:
            self.snapshots.settle(result[len(signal) + len(alive):])

    def log_window(self, loss: torch.Tensor, lr: float) -> None:
        """Collective: the window's loss, speed and snapshot costs; the sidecar's new records."""
        t, par, w = self.t, self.t.par, self.window
        loss_value = all_reduce_mean(loss, par)
        elapsed = w.compute_s
        grad_norm = t.engine.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        tok_s = w.steps * t.job.tokens_per_step / elapsed
        self.result = {"step": self.step_no, "loss": loss_value, "lr": lr, "tokens": self.tokens, "tokens_per_s": tok_s,
                       "tflops_per_rank": w.steps * self.flops_per_step / elapsed / par.world_size / 1e12,
                       "grad_norm": grad_norm}
        if par.device.type == "cuda":
            self.result["max_mem_gb"] = torch.cuda.max_memory_allocated(par.device) / 2**30
        if self.snapshots is not None:
            self.result.update(snapshot_s=w.snapshot_s, snapshot_wait_s=w.snapshot_wait_s,
                               snapshots_skipped=w.snapshots_skipped)
        norm_text = "n/a" if grad_norm is None else f"{grad_norm:.3f}"
        self.metrics.log(self.result, f"step {self.step_no}/{t.job.train.steps} | loss {loss_value:.4f} | "
                                      f"lr {lr:.2e} | {tok_s / 1e3:.1f}k tok/s | grad norm {norm_text}")
        show_new_evals(self.evals, par.is_main, self.metrics)
        self.window = Window()

    def evaluate_and_checkpoint(self) -> None:
        """Collective, when due: the held-out loss, a checkpoint. Their time is kept out of tokens/s."""
        t, job, par, step = self.t, self.t.job, self.t.par, self.step_no
        pause_start = time.perf_counter()
        if (job.eval.every and step % job.eval.every == 0) or (self.at_end and not self.preempted):
            held_out = validation_loss(t.engine, self.val_set, par.device, par.dp_group, par.dp)
            self.result = {**self.result, "val_loss": held_out.overall}
            by_source = {"val_loss_by_source": held_out.by_source} if held_out.by_source else {}
            sources = ", ".join(f"{n} {v:.4f}" for n, v in held_out.by_source.items())
            self.metrics.log({"step": step, "tokens": self.tokens, "val_loss": held_out.overall, **by_source},
                             f"step {step} | val loss {held_out.overall:.4f}" + (f" ({sources})" if sources else ""))
        if step % job.checkpoint.every == 0 or self.at_end or step in job.cooldowns.at:
            state = RunState(step=step, tokens=self.tokens, dp=par.dp, tp=par.tp,
                             tensor_parallel_layout=self.tp_layout, zero_stage=zero_stage(t.engine))
            tag = checkpoint.save(t.engine, t.checkpoint_dir, state, job.checkpoint.keep, par, self.averages,
                                  pinned=job.cooldowns.at)
            logger.info(f"saved checkpoint {os.path.join(t.checkpoint_dir, tag)}")
        self.window.paused += time.perf_counter() - pause_start

    def finish(self) -> dict:
        """Collective: say why the loop stopped, let the sidecar score the last snapshot, requeue a
        preempted Slurm job; returns the last logged metrics."""
        t, job, par, step = self.t, self.t.job, self.t.par, self.step_no
        if self.preempted:
            logger.info(f"stopped at step {step} on {self.preemption.received or 'a signal to another rank'}: "
                        f"checkpoint written; the same command resumes the run")
        elif job.train.stop_at is not None and step < job.train.steps:
            logger.info(f"stopped at step {step} (train.stop_at); the same command resumes the run")
        if self.snapshots is not None:
            # A preempted job has a short grace period: the sidecar gets a bounded time to finish, and
            # the requeued job's sidecar evaluates whatever it missed.
            finish_lawa(self.snapshots, self.sidecar, par, t.run.path, step, self.evals, self.metrics,
                        finished=step == job.train.steps,
                        wait_s=min(job.sidecar.exit_timeout_s, 60.0) if self.preempted else job.sidecar.exit_timeout_s)
        self.metrics.close()
        if self.preempted and job.checkpoint.requeue and par.is_main:
            requeue_slurm_job()
        return self.result


def held_out_set(t: Training) -> HeldOut:
    """This rank's held-out batches of every scored source (the trainer's and the sidecar's)."""
    b, par, job = t.batches, t.par, t.job
    scored = b.held_out_sources()
    return HeldOut([b.names[i] for i in scored], [float(b.probs[i]) for i in scored],
                   [b.val_batches(i, par.dp_rank, par.dp, job.eval.batches, job.train.micro_batch_size)
                    for i in scored])


def start_lawa(t: Training, step: int, val_set: HeldOut,
               averages: Optional[ShardAverages]) -> tuple[Optional[SnapshotWriter], Optional[SidecarSupervisor]]:
    """Collective: the snapshot ring buffer, the sidecar's spec and held-out set, and the sidecar."""
    job, par, run = t.job, t.par, t.run
    if job.snapshot.every == 0:
        return None, None
    root = t.ring.root
    snapshots = SnapshotWriter(job.snapshot, t.engine, par, t.ring, resume_step=step, averages=averages, run_dir=run.path)
    logger.info(f"snapshots: every {job.snapshot.every} steps into a ring of {job.snapshot.slots} slots in {root}")
    # What the sidecar needs, so that it can also be started by hand on this run directory.
    if par.is_main:
        protocol.clear_training_done(run.path)
        protocol.SidecarSpec(
            deepspeed=t.ds_config, dp=par.dp, tp=par.tp, snapshot_dir=os.path.abspath(root),
            snapshot_every=job.snapshot.every, merges=job.merges(),
            device=job.sidecar.device, training_device=par.device.type, precision=t.precision,
            poll_seconds=job.sidecar.poll_seconds, tensorboard=job.logging.tensorboard,
            export_hf=job.sidecar.export_hf, tasks=[os.path.abspath(p) for p in job.eval.tasks],
            harness_tasks=job.eval.harness_tasks, task_limit=job.eval.task_limit, task_every=job.eval.task_every,
            harness_include=os.path.abspath(job.eval.harness_include) if job.eval.harness_include else None,
            forecast=job.forecast_merge(),
            forecast_steps=[at + steps for at, steps, _, _ in job.cooldown_branches()]).write(run.path)
    if par.tp_rank == 0:
        protocol.write_val_batches(run.path, par.dp_rank, val_set)
    barrier()
    sidecar = None
    if job.sidecar.enabled:
        sidecar = SidecarSupervisor(job.sidecar, run.path, par, rank_env().master_addr)
    return snapshots, sidecar


def show_new_evals(evals, is_main: bool, metrics: MetricsLogger) -> None:
    if is_main:
        for record in evals.read():
            logger.info(protocol.format_eval_line(record))
            metrics.log_sidecar(record)


def show_eval_table(run_dir: str, is_main: bool) -> None:
    """The main rank prints the end-of-run table and verdict, and writes the run's report."""
    if is_main and protocol.read_eval_log(run_dir):
        logger.info("\n" + end_of_run_report(run_dir))


def finish_lawa(snapshots: SnapshotWriter, sidecar: Optional[SidecarSupervisor], par: Parallel, run_dir: str,
                step: int, evals, metrics: MetricsLogger, finished: bool, wait_s: float) -> None:
    """Collective: commit the last snapshot, let the sidecar evaluate it, and show the results."""
    snapshots.finish()
    if par.is_main:
        protocol.mark_training_done(run_dir, snapshots.last_committed, step)
    if sidecar is not None:
        logger.info("waiting for the sidecar to evaluate the last snapshot ...")
        sidecar.wait(wait_s)
    barrier()
    show_new_evals(evals, par.is_main, metrics)
    show_eval_table(run_dir, par.is_main)
    if finished:
        snapshots.cleanup()
