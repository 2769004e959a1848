"""The sidecar itself: one rank per training rank, in the same TP x DP layout, with its own
rendezvous. When a new snapshot slot is committed, each rank reads *its own* shard of every
snapshot the job's merges take (lawa.merges: a window and a weighting each), once each, oldest
first, adding it into each merge's fp32 sum; loads each merge's partitions straight into its ZeRO-3
parameters (nothing is consolidated on any rank) and the group evaluates, on the trainer's
held-out set: the raw newest slot, the headline merge (the first listed), the trainers' EMA/SWA of
the same step, then the other merges, which give way when a newer slot is committed meanwhile (the
log and the record say which were skipped). Results go to `eval.jsonl`; each merge's best is kept
as a committed slot (the headline's in `lawa_best/`, the others' in `merges/<name>/`).

Started by the trainers (`sidecar.enabled: true`), or by hand on a run directory, with the
training layout:

    torchrun --nproc_per_node 2 -m averaging.sidecar --run-dir runs/tiny_cpu --once
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from averaging import slots
from averaging.evaluate import HeldOutLoss, validation_loss
from averaging.lawa import add_weighted
from averaging.sidecar.protocol import (
    SidecarSpec,
    TrainingDone,
    append_eval_record,
    eval_scalars,
    format_eval_line,
    read_eval_log,
    read_training_done,
    read_val_batches,
)
from core.config import ConfigError
from core.deepspeed_compat import local_shard, use_deepspeed
from core.distributed import build_parallel, gather_objects, pick_device, unlink_cpu_allreduce_buffer
from core.engine import build_engine, inference_config
from core.flat_layout import FlatLayout, LayoutMismatch, chunk_numel, views
from core.log import logger, setup_logging
from core.private_folder import NotPrivate, PrivateFolder
from core.run_dir import RunDir
from core.zero_folder import ZeroFolder
from models.registry import build_model, read_model_config

PR_SET_PDEATHSIG = 1


@torch.no_grad()
def load_partitions(params: dict[str, torch.nn.Parameter], flat_groups: list[torch.Tensor], layout: FlatLayout,
                    dp_rank: int, dp_group) -> None:
    """Put this rank's flat groups of a slot into the sidecar's model. ZeRO-3: each parameter's
    chunk straight into its local shard (nothing gathered here; the forward gathers). ZeRO-1/2: the
    data-parallel ranks all-gather their partitions into each group's whole flat, and every rank
    copies every parameter whole, as their trainers hold them."""
    missing = [name for name in layout.names() if name not in params]
    if missing:
        raise LayoutMismatch(f"snapshot parameter {missing[0]} is not in the model")
    if layout.stage == 3:
        for name, (elements, _) in views(flat_groups, layout, dp_rank).items():
            chunk = local_shard(params[name])
            if chunk.numel() != chunk_numel(layout.numel(name), layout.dp):
                raise LayoutMismatch(f"{name}: snapshot chunk of {chunk_numel(layout.numel(name), layout.dp)} elements, "
                                     f"model's is {chunk.numel()}")
            chunk.data.view(-1).zero_()[: elements.numel()].copy_(elements)
        return
    device = next(iter(params.values())).device
    gathered = []
    for g, size in enumerate(layout.partition_sizes):
        mine = torch.zeros(size, dtype=torch.float32, device=device)
        mine[: flat_groups[g].numel()].copy_(flat_groups[g])
        parts = [torch.empty_like(mine) for _ in range(layout.dp)]
        dist.all_gather(parts, mine, group=dp_group)
        gathered.append(parts)
    whole = layout.whole_groups([[parts[r] for parts in gathered] for r in range(layout.dp)])
    for name in layout.names():
        g, offset = layout.place(name)
        p = params[name]
        p.data.copy_(whole[g][offset: offset + layout.numel(name)].view_as(p.data))


def die_with_parent(parent_pid: Optional[int]) -> None:
    """First thing in the sidecar's process: the kernel kills it when its trainer dies, however
    the trainer dies (a sidecar blocked in a collective would otherwise outlive it). Done in the
    child's own Python, not in a preexec_fn, which runs between fork and exec while the trainer has
    threads (a lock one of them held stays held in the child). A trainer that died before this call
    is caught by comparing the parent."""
    if parent_pid is None:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the sidecar still leaves once it sees its parent gone
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def best_losses(records: list[dict[str, Any]], headline: str) -> dict[str, float]:
    """Each merge's best loss so far, from eval.jsonl (a restarted sidecar keeps its bests)."""
    best: dict[str, float] = {}
    for r in records:
        for name, m in r.get("merges", {headline: {"best": r.get("best")}}).items():
            loss = r.get(f"{name}_val_loss")
            if m.get("best") and loss is not None:
                best[name] = min(loss, best.get(name, float("inf")))
    return best


# How long the sidecar waits, after the trainers said training is done, for the last snapshot they
# committed to show up here (they mark it done only once every node's commit is durable, so it is
# there at once unless the slot is gone: its node's /dev/shm cleared, the node lost).
LAST_SLOT_GRACE_S = 60.0


@dataclass
class Look:
    """What every rank sees at one poll, agreed on by all."""

    committed: list[int]  # steps committed on every rank's node, less the steps left out
    done: Optional[TrainingDone]  # the trainers' marker, once training has ended
    orphaned: bool  # some rank's trainer is gone


@dataclass
class Reading:
    """What one rank read for one evaluation: its shard of the newest slot, each merge's weighted
    sum of its shards, and the trainers' EMA/SWA of the same step."""

    newest: slots.SlotManifest
    raw: list[torch.Tensor]
    model_states: dict[str, Any]
    selected: dict[str, list[int]]  # merge -> the steps it takes, oldest first
    weights: dict[str, dict[int, float]]  # merge -> step -> weight
    sums: dict[str, Optional[list[torch.Tensor]]]  # merge -> its weighted sum (None: it takes only the newest)
    averages: dict[str, list[torch.Tensor]]  # ema/swa -> this rank's shard
    read_s: float
    average_s: float
    bytes_read: int


@dataclass
class Scores:
    losses: dict[str, float]  # raw, every merge scored, ema/swa
    by_source: dict[str, dict[str, float]]
    tasks: dict[str, dict]
    skipped: list[str]  # merges that gave way because a newer slot was committed meanwhile


class Sidecar:
    def __init__(self, run_dir: str, parent_pid: Optional[int]):
        self.run_dir = run_dir
        self.paths = RunDir(run_dir)
        self.parent_pid = parent_pid
        self.spec = spec = SidecarSpec.read(run_dir)
        self.root = spec.snapshot_dir
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        try:
            self.device = pick_device(local_rank, spec.sidecar_device)
        except ConfigError as e:
            raise SystemExit(f"sidecar.device={spec.device}: {e}") from None
        use_deepspeed(self.device.type).init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False)
        unlink_cpu_allreduce_buffer()
        if dist.get_world_size() != spec.dp * spec.tp:
            raise SystemExit(f"the sidecar must run with the training layout: {spec.dp * spec.tp} ranks "
                             f"(data {spec.dp} × tensor {spec.tp}), not {dist.get_world_size()}")
        self.par = build_parallel(spec.tp, local_rank, self.device)
        setup_logging(self.par.rank, prefix="[sidecar] ")
        self.ring = self._open_ring()
        self.is_main = self.par.is_main
        self.model_config = read_model_config(self.paths.model)
        ds_config = inference_config(spec.deepspeed, bf16=spec.precision == "bf16" and self.device.type == "cuda")
        self.engine = build_engine(lambda: build_model(self.model_config, self.par.tp_group), ds_config, self.par)
        self.params = dict(self.engine.module.named_parameters())
        self.val = read_val_batches(run_dir, self.par.dp_rank)
        self.tasks, self.lm = None, None
        if spec.tasks or spec.harness_tasks:
            self._load_tasks()
        self.bad_steps: set[int] = set()
        done = read_eval_log(run_dir)
        self.last_step = done[-1]["step"] if done else -1
        self.best_loss = best_losses(done, self.spec.merges[0].name)
        self.tb = None
        if self.is_main and spec.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.paths.tensorboard, "sidecar"))
            except ImportError:
                pass

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _gather(self, value: Any) -> list[Any]:
        return gather_objects(value, self.par.ctrl_group)

    def _parent_alive(self) -> bool:
        if self.parent_pid is None:
            return True
        try:
            os.kill(self.parent_pid, 0)
        except ProcessLookupError:
            return False
        return os.getppid() == self.parent_pid

    # -- the cycle --------------------------------------------------------------------------------

    def run(self, once: bool) -> None:
        """Score each newly committed slot until the trainers are done and their last snapshot is
        scored (or they are gone); with `once`, until the newest slot is scored."""
        waiting_since: Optional[float] = None
        while True:
            look = self._look()
            target = self.next_target(look.committed)
            if target is not None:
                self._say_passed_over(look.committed, target)
                if self.evaluate([s for s in look.committed if s <= target]):
                    self.last_step = target
                continue  # look again at once: a retry, or a slot committed meanwhile
            if look.orphaned:
                return
            if look.done is not None:
                last = look.done.last_snapshot_step
                waiting_since = waiting_since or time.monotonic()
                if once or last is None or self.last_step >= last or last in self.bad_steps:
                    break
                if time.monotonic() - waiting_since > LAST_SLOT_GRACE_S:
                    if self.is_main:
                        logger.warning(f"the trainers' last snapshot, step {last}, is not readable here after "
                                       f"{LAST_SLOT_GRACE_S:.0f}s; leaving without it (newest scored: {self.last_step})")
                    break
            if once:
                return
            time.sleep(self.spec.poll_seconds)
        if self.spec.export_hf:
            self.export_best()

    def _open_ring(self) -> PrivateFolder:
        """The ring, opened as the trainers opened it (launcher/ring.py): never read a slot another user
        could have planted. Each node's first rank also removes what killed writers left half written."""
        try:
            ring = PrivateFolder(self.root, create=False)
            if self.par.is_node_first:
                for _ in ring.walk():
                    pass
                slots.remove_stale_copies(self.root)
        except (NotPrivate, OSError) as e:
            raise SystemExit(f"snapshot ring: {e}") from None
        return ring

    def _look(self) -> Look:
        """Collective. Each rank reads the training-done marker before it lists the committed slots:
        the trainers write the marker after their last commit, so a rank that sees the marker also
        sees every slot it vouches for."""
        done = read_training_done(self.run_dir)
        committed = slots.committed_steps(self.root)
        views = self._gather((done, committed, self._parent_alive()))
        common = set.intersection(*(set(v[1]) for v in views)) - self.bad_steps
        return Look(sorted(common), next((v[0] for v in views if v[0] is not None), None),
                    not all(v[2] for v in views))

    def next_target(self, committed: list[int]) -> Optional[int]:
        """The slot to score next: the newest committed past the last scored, unless a scheduled
        cooldown ends at an older one still in the ring (its forecast needs that step's score)."""
        newer = [s for s in committed if s > self.last_step]
        due = [s for s in newer if s in self.spec.forecast_steps]
        return min(due) if due else max(newer, default=None)

    def _say_passed_over(self, committed: list[int], target: int) -> None:
        if not self.is_main:
            return
        passed = [s for s in committed if self.last_step < s < target]
        which = (f"step {target}, where a scheduled cooldown ends, before the newer {max(committed)}"
                 if target < max(committed) else f"the newest, {target}")
        if passed and self.last_step >= 0:
            some = f"step {passed[0]} was" if len(passed) == 1 else f"steps {', '.join(map(str, passed))} were"
            logger.warning(f"behind: {some} committed while step {self.last_step} was scored; scoring {which}")
        elif target < max(committed):
            logger.info(f"scoring {which}")

    def evaluate(self, committed: list[int]) -> bool:
        """Collective. Score the newest committed slot raw, every merge of it, and the trainers'
        EMA/SWA; False when the set must be chosen again (a slot vanished, or is left out)."""
        reading, outcome = self._read(committed)
        if not self._agree(outcome):
            return False
        scores = self._score(reading)
        self._record(reading, scores)
        return True

    def _read(self, committed: list[int]) -> tuple[Optional[Reading], tuple]:
        """This rank's shards of every snapshot the merges take, each read once, oldest first, and
        added into every merge that takes it. The outcome: ("ok",), ("vanished",) or ("bad", step,
        why) for a slot that cannot be used (corrupt, another layout, unreadable)."""
        try:
            self.ring.check()  # still the folder opened at start, not one put in its place
        except NotPrivate as e:
            raise SystemExit(f"snapshot ring: {e}") from None
        newest_step = max(committed)
        selected = {m.name: m.select(committed) for m in self.spec.merges}
        weights = {m.name: dict(zip(selected[m.name], m.weights_for(selected[m.name]))) for m in self.spec.merges}
        sums: dict[str, Optional[list[torch.Tensor]]] = {name: None for name in selected}
        raw, model_states = None, None
        averages: dict[str, list[torch.Tensor]] = {}
        rank = (self.par.dp_rank, self.par.tp_rank)
        start, bytes_read, average_s = time.perf_counter(), 0, 0.0
        step = newest_step  # what a failure is blamed on
        try:
            newest = slots.read_manifest(slots.slot_path(self.root, newest_step))
            for step in sorted(set().union(*selected.values()) | {newest_step}):
                path = slots.slot_path(self.root, step)
                manifest = newest if step == newest_step else slots.read_manifest(path)
                slots.check_compatible([newest, manifest])  # an older slot unlike the newest is left out
                flat, _ = slots.read_shard(path, *rank, manifest)
                bytes_read += sum(t.numel() * 4 for t in flat)
                sum_start = time.perf_counter()
                for name, w in weights.items():
                    if step in w:
                        sums[name] = add_weighted(sums[name], flat, w[step])
                average_s += time.perf_counter() - sum_start
                if step == newest_step:
                    raw = flat
                    model_states = slots.read_model_states(path, *rank, manifest)
            step = newest_step
            for kind in newest.averages:  # the trainers' EMA/SWA as of the newest step, in the same slot
                averages[kind], _ = slots.read_shard(slots.slot_path(self.root, step), *rank, newest, kind=kind)
        except slots.SlotVanished:
            return None, ("vanished",)
        except (slots.SlotError, LayoutMismatch) as e:
            return None, ("bad", step, str(e))
        return Reading(newest, raw, model_states, selected, weights, sums, averages,
                       time.perf_counter() - start - average_s, average_s, bytes_read), ("ok",)

    def _agree(self, outcome: tuple) -> bool:
        """Collective: True when every rank read its shards. A slot some rank could not use is left
        out on every rank (all see the same gathered outcomes), with one line saying which and why."""
        ok = True
        for o in self._gather(outcome):
            if o[0] == "bad" and o[1] not in self.bad_steps:
                self.bad_steps.add(o[1])
                if self.is_main:
                    logger.warning(f"leaving out step {o[1]}: {o[2]}")
            ok = ok and o[0] == "ok"
        return ok

    def _score(self, r: Reading) -> Scores:
        """Collective: the held-out loss (and task scores) of the raw weights, the headline merge,
        the trainers' EMA/SWA, then the other merges until a newer slot is committed."""
        layout = r.newest.layout()
        s = Scores({}, {}, {}, [])

        def score(name: str, flat: list[torch.Tensor]) -> None:
            load_partitions(self.params, flat, layout, self.par.dp_rank, self.par.dp_group)
            held_out = self._loss()
            s.losses[name], s.by_source[name] = held_out.overall, held_out.by_source
            s.tasks[name] = self._task_scores(r.newest.step)

        def score_merge(merge) -> None:
            if r.selected[merge.name] == [r.newest.step]:  # one snapshot: the raw model itself
                s.losses[merge.name], s.tasks[merge.name] = s.losses["raw"], s.tasks["raw"]
                s.by_source[merge.name] = s.by_source["raw"]
            else:
                score(merge.name, r.sums[merge.name])

        score("raw", r.raw)
        headline, *rest = self.spec.merges
        score_merge(headline)
        for kind, flat in r.averages.items():
            score(kind, flat)
        for i, merge in enumerate(rest):
            # The headline keeps up with every commit; the others give way when the sidecar falls
            # behind, except where a scheduled cooldown ends (the forecast table compares them all).
            if r.newest.step not in self.spec.forecast_steps and self._behind(r.newest.step):
                s.skipped = [m.name for m in rest[i:]]
                if self.is_main:
                    logger.warning(f"behind: a snapshot newer than step {r.newest.step} is committed; skipped "
                                   f"merges {', '.join(s.skipped)} at step {r.newest.step}")
                break
            score_merge(merge)
        return s

    def _record(self, r: Reading, s: Scores) -> None:
        """Collective: keep each merge's new best, then (main rank) the eval.jsonl record, TensorBoard
        and the log line."""
        headline = self.spec.merges[0]
        merges_record = {}
        for merge in self.spec.merges:
            if merge.name not in s.losses:
                continue
            steps = r.selected[merge.name]
            is_best = s.losses[merge.name] < self.best_loss.get(merge.name, float("inf"))
            if is_best:
                self.best_loss[merge.name] = s.losses[merge.name]
                if merge.keep_best:
                    self._save_best(merge, merge is headline, r.sums[merge.name] if len(steps) > 1 else r.raw,
                                    r.model_states, r.newest, steps, [r.weights[merge.name][t] for t in steps],
                                    s.losses[merge.name])
            merges_record[merge.name] = {"steps": steps[::-1],
                                         "weights": [r.weights[merge.name][t] for t in steps[::-1]], "best": is_best}
        record = {
            "step": r.newest.step, "tokens": r.newest.tokens, "raw_val_loss": s.losses["raw"],
            **{f"{name}_val_loss": loss for name, loss in s.losses.items() if name != "raw"},
            "k": len(r.selected[headline.name]),
            "steps_averaged": r.selected[headline.name][::-1], "merges": merges_record, "averages": r.newest.averages,
            **({"forecast": self.spec.forecast, "forecast_val_loss": s.losses[self.spec.forecast]}
               if self.spec.forecast in s.losses else {}),
            **({"tasks": s.tasks} if s.tasks.get("raw") else {}),
            **({"val_loss_by_source": s.by_source} if s.by_source["raw"] else {}),
            "best": merges_record[headline.name]["best"], "skipped": s.skipped, "read_s": r.read_s,
            "average_s": r.average_s, "bytes_averaged": r.bytes_read,
        }
        if not self.is_main:
            return
        append_eval_record(self.run_dir, {"time": round(time.time(), 3), **record})
        if self.tb is not None:
            for name, value in eval_scalars(record).items():
                self.tb.add_scalar(name, value, record["step"])
            self.tb.flush()
        logger.info(format_eval_line(record))

    def _behind(self, step: int) -> bool:
        """Collective: has every rank seen a slot newer than `step` committed?"""
        views = self._gather(slots.committed_steps(self.root))
        return max(set.intersection(*(set(v) for v in views)) - self.bad_steps, default=step) > step

    def export_best(self) -> None:
        """The best LAWA average as a Hugging Face folder (streamed tensor by tensor by the main rank)."""
        if self.is_main:
            from models.hf import export, run_tokenizer

            best = slots.committed_steps(self.paths.lawa_best)
            if best:
                export(ZeroFolder(slots.slot_path(self.paths.lawa_best, best[-1])), self.model_config,
                       self.paths.lawa_best_hf, run_tokenizer(self.run_dir))
                logger.info(f"exported the best LAWA average (step {best[-1]}) to {self.paths.lawa_best_hf}")
        dist.barrier(group=self.par.ctrl_group)

    def _load_tasks(self) -> None:
        """The job's evaluation tasks through lm-evaluation-harness, loaded once (offline); each
        data-parallel rank scores its share of every task's requests on the sidecar's engine."""
        import logging

        os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's progress bars, once per model scored
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        from averaging.harness import HarnessTaskError, ShardedLM, load_tasks
        from core.tokenizer import load_tokenizer
        from models.hf import run_tokenizer

        try:
            self.tasks = load_tasks(self.spec.tasks + self.spec.harness_tasks, self.spec.harness_include)
        except HarnessTaskError as e:
            raise SystemExit(f"eval tasks: {e}") from None
        self.lm = ShardedLM(self._full_logits, load_tokenizer(run_tokenizer(self.run_dir)),
                            self.model_config.block_size, self.device, (self.par.dp_rank, self.par.dp), self._gather)

    def _full_logits(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        logits, _ = self.engine(x, keep=keep)  # (N, V/tp): this rank's slice of the vocabulary
        if self.par.tp > 1:
            parts = [torch.empty_like(logits) for _ in range(self.par.tp)]
            dist.all_gather(parts, logits.contiguous(), group=self.par.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits  # (N, V)

    def _task_scores(self, step: int) -> dict[str, dict[str, float]]:
        """Collective: every task's metrics on the loaded weights, at the steps the job scores them."""
        if self.tasks is None or (self.spec.task_every and step % self.spec.task_every):
            return {}
        from averaging.harness import evaluate, flat_results

        self.engine.eval()
        with torch.no_grad():
            return flat_results(evaluate(self.lm, self.tasks, self.spec.task_limit))

    def _loss(self) -> HeldOutLoss:
        return validation_loss(self.engine, self.val, self.device, self.par.dp_group, self.par.dp)

    def _save_best(self, merge, headline: bool, averaged: list[torch.Tensor], model_states: dict,
                   newest: slots.SlotManifest, steps: list[int], weights: list[float], loss: float) -> None:
        """Collective: every rank writes its shard, then one rank (of the whole group: the run
        directory is shared by all nodes) commits the slot and drops the merge's previous best."""
        folder = self.paths.merge_best(merge.name, headline)
        path = slots.slot_path(folder, newest.step)
        if self.is_main and slots.is_committed(path):  # this step's best from before a restart
            slots.remove_slot(path)
        dist.barrier(group=self.par.ctrl_group)
        layout = newest.layout()
        files = slots.write_shard(path, self.par.dp_rank, self.par.tp_rank, averaged,
                                  {**model_states, "global_steps": newest.step}, layout=layout)
        merged = {name: meta for rank_files in self._gather(files) for name, meta in rank_files.items()}
        if self.is_main:
            slots.commit(path, slots.SlotManifest(
                kind="lawa", step=newest.step, tokens=newest.tokens, lr=newest.lr, dp=newest.dp, tp=newest.tp,
                param_shapes=newest.param_shapes, files=merged, tensor_parallel_layout=newest.tensor_parallel_layout,
                **layout.to_json(), ds_version=newest.ds_version, steps_averaged=steps[::-1], merge_weights=weights[::-1],
                merge=merge.name, val_loss=loss))
            for step, old, _ in slots.list_slots(folder):
                if step != newest.step:
                    slots.remove_slot(old)
        dist.barrier(group=self.par.ctrl_group)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m averaging.sidecar", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="the training run's directory")
    parser.add_argument("--once", action="store_true", help="evaluate the newest committed slots once and exit")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not SidecarSpec.exists(args.run_dir):
        print(f"error: {args.run_dir} has no {RunDir(args.run_dir).sidecar_spec}: is it the run directory of a "
              f"job with snapshot.every > 0?", file=sys.stderr)
        return 2
    # Slurm's warning signal reaches every process of the job step; the trainers handle it and
    # tell the sidecar when to finish (the training_done marker).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(args.parent_pid)
    sidecar = Sidecar(args.run_dir, args.parent_pid)
    sidecar.run(args.once)
    sidecar.close()
    return 0
