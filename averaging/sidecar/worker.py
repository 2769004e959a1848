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
import os
import signal
import sys
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from averaging import slots
from averaging.evaluate import HeldOutLoss, validation_loss
from averaging.lawa import add_weighted
from averaging.sidecar.protocol import (
    SidecarSpec,
    append_eval_record,
    format_eval_line,
    read_eval_log,
    read_training_done,
    read_val_batches,
)
from core.config import ConfigError
from core.distributed import build_parallel, gather_objects, pick_device
from core.engine import build_engine, inference_config, use_deepspeed
from core.log import logger, setup_logging
from core.run_dir import RunDir
from core.zero_checkpoint import LayoutMismatch, split_partitions
from core.zero_folder import ZeroFolder
from models.registry import build_model, read_model_config


def load_partitions(params: dict[str, torch.nn.Parameter], flat_groups: list[torch.Tensor],
                    param_shapes: list[dict[str, Any]], dp: int) -> None:
    """Copy each parameter's partition out of the flat groups into its ZeRO-3 local shard."""
    for name, part in split_partitions(flat_groups, param_shapes, dp).items():
        p = params.get(name)
        if p is None:
            raise LayoutMismatch(f"snapshot parameter {name} is not in the model")
        if p.ds_tensor.numel() != part.numel():
            raise LayoutMismatch(f"{name}: snapshot partition of {part.numel()} elements, model's is "
                                 f"{p.ds_tensor.numel()}")
        p.ds_tensor.data.copy_(part.view_as(p.ds_tensor))


def best_losses(records: list[dict[str, Any]], headline: str) -> dict[str, float]:
    """Each merge's best loss so far, from eval.jsonl (a restarted sidecar keeps its bests)."""
    best: dict[str, float] = {}
    for r in records:
        for name, m in r.get("merges", {headline: {"best": r.get("best")}}).items():
            loss = r.get(f"{name}_val_loss")
            if m.get("best") and loss is not None:
                best[name] = min(loss, best.get(name, float("inf")))
    return best


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
        if dist.get_world_size() != spec.dp * spec.tp:
            raise SystemExit(f"the sidecar must run with the training layout: {spec.dp * spec.tp} ranks "
                             f"(data {spec.dp} × tensor {spec.tp}), not {dist.get_world_size()}")
        self.par = build_parallel(spec.tp, local_rank, self.device)
        setup_logging(self.par.rank, prefix="[sidecar] ")
        self.is_main = self.par.is_main
        self.model_config = read_model_config(self.paths.model)
        ds_config = inference_config(spec.deepspeed, bf16=spec.precision == "bf16" and self.device.type == "cuda")
        self.engine = build_engine(lambda: build_model(self.model_config, self.par.tp_group), ds_config, self.par)
        self.params = dict(self.engine.module.named_parameters())
        self.val = read_val_batches(run_dir, self.par.dp_rank)
        self.tasks, self.encode = [], None
        if spec.tasks:
            from averaging.zero_shot import load_task
            from core.tokenizer import load_tokenizer
            from models.hf import run_tokenizer

            self.tasks = [load_task(path, spec.task_limit) for path in spec.tasks]
            self.encode = load_tokenizer(run_tokenizer(run_dir)).encode
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

    def run(self, once: bool) -> None:
        while True:
            views = self._gather((slots.committed_steps(self.root), read_training_done(self.run_dir),
                                  self._parent_alive()))
            common = set.intersection(*(set(v[0]) for v in views)) - self.bad_steps
            done = next((v[1] for v in views if v[1] is not None), None)
            orphaned = not all(v[2] for v in views)
            newest = max(common, default=None)
            if newest is not None and newest > self.last_step:
                passed = sorted(s for s in common if self.last_step < s < newest)
                if passed and self.last_step >= 0 and self.is_main:
                    logger.warning(f"behind: steps {', '.join(map(str, passed))} were committed while step "
                                   f"{self.last_step} was scored; scoring the newest, {newest}")
                if self.evaluate(sorted(common)):
                    self.last_step = newest
                continue  # look again at once: a retry, or a slot committed meanwhile
            # Nothing newer to do: the trainers mark training done only after their last commit.
            if done is not None and self.spec.export_hf:
                self.export_best()
            if once or orphaned or done is not None:
                return
            time.sleep(self.spec.poll_seconds)

    def evaluate(self, committed: list[int]) -> bool:
        """Score the newest committed slot raw, every merge of it, and the trainers' EMA/SWA;
        False when the set must be chosen again."""
        newest_step = max(committed)
        selected = {m.name: m.select(committed) for m in self.spec.merges}
        weights = {m.name: dict(zip(selected[m.name], m.weights_for(selected[m.name]))) for m in self.spec.merges}
        outcome: tuple = ("ok",)
        sums: dict[str, Optional[list[torch.Tensor]]] = {name: None for name in selected}
        raw, model_states, newest, others = None, None, None, {}
        rank = (self.par.dp_rank, self.par.tp_rank)
        start = time.perf_counter()
        bytes_read, average_s = 0, 0.0
        step = newest_step  # what a corrupt file is blamed on
        try:
            first = None
            # Oldest first, each snapshot read once and added to every merge that takes it.
            for step in sorted(set().union(*selected.values()) | {newest_step}):
                path = slots.slot_path(self.root, step)
                manifest = slots.read_manifest(path)
                if first is not None:
                    try:
                        slots.check_compatible([first, manifest])
                    except LayoutMismatch as e:
                        outcome = ("mismatch", step, str(e))
                        break
                first = first or manifest
                flat, _ = slots.read_shard(path, *rank, manifest)
                bytes_read += sum(t.numel() * 4 for t in flat)
                sum_start = time.perf_counter()
                for name, w in weights.items():
                    if step in w:
                        sums[name] = add_weighted(sums[name], flat, w[step])
                average_s += time.perf_counter() - sum_start
                if step == newest_step:
                    raw, newest = flat, manifest
                    model_states = slots.read_model_states(path, *rank, manifest)
            if outcome == ("ok",):
                # The trainers' EMA/SWA as of the newest step, stored in the same slot.
                step = newest_step
                for kind in newest.averages:
                    others[kind], _ = slots.read_shard(slots.slot_path(self.root, step), *rank, newest, kind=kind)
        except slots.SlotVanished:
            outcome = ("vanished",)
        except slots.SlotCorrupt as e:
            outcome = ("corrupt", step, str(e))
        read_s = time.perf_counter() - start - average_s

        retry = False
        for o in self._gather(outcome):
            if o[0] == "vanished":
                retry = True
            elif o[0] in ("corrupt", "mismatch"):
                # Every rank sees the same gathered outcomes, so all exclude the same steps.
                self.bad_steps.add(o[1])
                if self.is_main:
                    logger.warning(f"leaving out step {o[1]}: {o[2]}")
                retry = True
        if retry:
            return False

        shapes = newest.shapes()
        task_scores = {}
        losses: dict[str, float] = {}
        by_source: dict[str, dict[str, float]] = {}

        def score(name: str, flat: list[torch.Tensor]) -> None:
            load_partitions(self.params, flat, shapes, newest.dp)
            held_out = self._loss()
            losses[name], by_source[name] = held_out.overall, held_out.by_source
            task_scores[name] = self._task_scores()

        score("raw", raw)
        headline, *rest = self.spec.merges

        def score_merge(merge) -> None:
            if selected[merge.name] == [newest_step]:  # one snapshot: the raw model itself
                losses[merge.name], task_scores[merge.name] = losses["raw"], task_scores["raw"]
                by_source[merge.name] = by_source["raw"]
            else:
                score(merge.name, sums[merge.name])

        score_merge(headline)
        for kind, flat in others.items():  # the trainers' EMA/SWA: one evaluation each
            score(kind, flat)
        skipped: list[str] = []
        for i, merge in enumerate(rest):
            # The headline keeps up with every commit; the others give way when the sidecar falls behind.
            if self._behind(newest_step):
                skipped = [m.name for m in rest[i:]]
                if self.is_main:
                    logger.warning(f"behind: a snapshot newer than step {newest_step} is committed; skipped "
                                   f"merges {', '.join(skipped)} at step {newest_step}")
                break
            score_merge(merge)

        merges_record = {}
        for merge in self.spec.merges:
            if merge.name not in losses:
                continue
            steps = selected[merge.name]
            is_best = losses[merge.name] < self.best_loss.get(merge.name, float("inf"))
            if is_best:
                self.best_loss[merge.name] = losses[merge.name]
                if merge.keep_best:
                    self._save_best(merge, merge is headline, sums[merge.name] if len(steps) > 1 else raw,
                                    model_states, newest, steps, [weights[merge.name][s] for s in steps],
                                    losses[merge.name])
            merges_record[merge.name] = {"steps": steps[::-1], "weights": [weights[merge.name][s] for s in steps[::-1]],
                                         "best": is_best}
        record = {
            "step": newest.step, "tokens": newest.tokens, "raw_val_loss": losses["raw"],
            **{f"{name}_val_loss": loss for name, loss in losses.items() if name != "raw"},
            "k": len(selected[headline.name]),
            "steps_averaged": selected[headline.name][::-1], "merges": merges_record, "averages": newest.averages,
            **({"tasks": task_scores} if self.tasks else {}),
            **({"val_loss_by_source": by_source} if by_source["raw"] else {}),
            "best": merges_record[headline.name]["best"], "skipped": skipped, "read_s": read_s,
            "average_s": average_s, "bytes_averaged": bytes_read,
        }
        if self.is_main:
            append_eval_record(self.run_dir, {"time": round(time.time(), 3), **record})
            if self.tb is not None:
                for name, loss in losses.items():
                    self.tb.add_scalar(f"val_loss/{name}", loss, record["step"])
                    if name != "raw":
                        self.tb.add_scalar(f"val_loss_minus_raw/{name}", loss - losses["raw"], record["step"])
                    for source, value in by_source[name].items():  # a panel per source, every method in it
                        self.tb.add_scalar(f"val_loss_by_source/{source}/{name}", value, record["step"])
                self.tb.flush()
            logger.info(format_eval_line(record))
        return True

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

    def _task_scores(self) -> dict[str, dict[str, float]]:
        """Collective: each data-parallel rank scores its share of every task's examples."""
        if not self.tasks:
            return {}
        from averaging.zero_shot import evaluate_task, summarize

        def full_logits(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            logits, _ = self.engine(x, keep=keep)  # (N, V/tp): this rank's slice of the vocabulary
            if self.par.tp > 1:
                parts = [torch.empty_like(logits) for _ in range(self.par.tp)]
                dist.all_gather(parts, logits.contiguous(), group=self.par.tp_group)
                logits = torch.cat(parts, dim=-1)
            return logits  # (N, V)

        scores = {}
        self.engine.eval()
        with torch.no_grad():
            for task in self.tasks:
                sums = evaluate_task(task, full_logits, self.encode, self.model_config.block_size, self.device,
                                     (self.par.dp_rank, self.par.dp))
                # Tensor-parallel ranks of one data-parallel rank scored the same examples: count once.
                gathered = self._gather(sums if self.par.tp_rank == 0 else None)
                total = {k: sum(g[k] for g in gathered if g is not None) for k in sums}
                scores[task.name] = summarize(task, total)
        return scores

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
        files = slots.write_shard(path, self.par.dp_rank, self.par.tp_rank, averaged,
                                  {**model_states, "global_steps": newest.step})
        merged = {name: meta for rank_files in self._gather(files) for name, meta in rank_files.items()}
        if self.is_main:
            slots.commit(path, slots.SlotManifest(
                kind="lawa", step=newest.step, tokens=newest.tokens, lr=newest.lr, dp=newest.dp, tp=newest.tp,
                param_shapes=newest.param_shapes, files=merged, tensor_parallel_layout=newest.tensor_parallel_layout,
                ds_version=newest.ds_version, steps_averaged=steps[::-1], merge_weights=weights[::-1],
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
    sidecar = Sidecar(args.run_dir, args.parent_pid)
    sidecar.run(args.once)
    sidecar.close()
    return 0
