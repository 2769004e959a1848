"""The sidecar itself: one rank per training rank, in the same TP x DP layout, with its own
rendezvous. When a new snapshot slot is committed, each rank reads *its own* shard of the latest
k committed slots (spaced `lawa.spacing` steps apart), averages them element-wise in fp32, loads
the averaged partitions straight into its ZeRO-3 parameters (nothing is consolidated on any rank)
and the group evaluates the raw latest slot and the average on the trainer's held-out set, then
the trainers' EMA/SWA of the same step. Results go to `eval.jsonl`; the best average is kept as a
committed slot in `lawa_best/`.

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
from averaging.evaluate import validation_loss
from averaging.lawa import average_shards, select_spaced
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
from core.zero_checkpoint import LayoutMismatch, consolidate, split_partitions
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
        self.best_loss = min((r["lawa_val_loss"] for r in done if r.get("best")), default=float("inf"))
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
        """Average and evaluate the newest set; False when it must be chosen again."""
        chosen = select_spaced(committed, self.spec.lawa_k, self.spec.lawa_spacing)
        outcome: tuple = ("ok",)
        shards, manifests, model_states, others = [], [], None, {}
        rank = (self.par.dp_rank, self.par.tp_rank)
        start = time.perf_counter()
        step = chosen[0]  # what a corrupt file is blamed on
        try:
            for step in chosen:
                path = slots.slot_path(self.root, step)
                manifest = slots.read_manifest(path)
                if manifests:
                    try:
                        slots.check_compatible([manifests[0], manifest])
                    except LayoutMismatch as e:
                        outcome = ("mismatch", step, str(e))
                        break
                flat, _ = slots.read_shard(path, *rank, manifest)
                if model_states is None:
                    model_states = slots.read_model_states(path, *rank, manifest)
                shards.append(flat)
                manifests.append(manifest)
            if outcome == ("ok",):
                # The trainers' EMA/SWA as of the newest step, stored in the same slot.
                step = chosen[0]
                newest_path = slots.slot_path(self.root, step)
                for kind in manifests[0].averages:
                    others[kind], _ = slots.read_shard(newest_path, *rank, manifests[0], kind=kind)
        except slots.SlotVanished:
            outcome = ("vanished",)
        except slots.SlotCorrupt as e:
            outcome = ("corrupt", step, str(e))
        read_s = time.perf_counter() - start

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

        start = time.perf_counter()
        averaged = average_shards(shards) if len(shards) > 1 else shards[0]
        average_s = time.perf_counter() - start
        newest = manifests[0]
        shapes = newest.shapes()
        task_scores = {}
        load_partitions(self.params, shards[0], shapes, newest.dp)
        raw_loss = self._loss()
        task_scores["raw"] = self._task_scores()
        if len(shards) > 1:
            load_partitions(self.params, averaged, shapes, newest.dp)
            lawa_loss = self._loss()
            task_scores["lawa"] = self._task_scores()
        else:
            lawa_loss = raw_loss
            task_scores["lawa"] = task_scores["raw"]
        other_losses = {}
        for kind, flat in others.items():
            load_partitions(self.params, flat, shapes, newest.dp)
            other_losses[f"{kind}_val_loss"] = self._loss()
            task_scores[kind] = self._task_scores()
        is_best = lawa_loss < self.best_loss
        if is_best:
            self.best_loss = lawa_loss
            self._save_best(averaged, model_states, newest, [m.step for m in manifests], lawa_loss)
        record = {
            "step": newest.step, "tokens": newest.tokens, "raw_val_loss": raw_loss,
            "lawa_val_loss": lawa_loss, "k": len(shards), "steps_averaged": [m.step for m in manifests],
            **other_losses, "averages": newest.averages,
            **({"tasks": task_scores} if self.tasks else {}),
            "best": is_best, "read_s": read_s, "average_s": average_s,
            "bytes_averaged": sum(t.numel() * 4 for shard in shards for t in shard),
        }
        if self.is_main:
            append_eval_record(self.run_dir, {"time": round(time.time(), 3), **record})
            if self.tb is not None:
                self.tb.add_scalar("val_loss/raw", raw_loss, record["step"])
                self.tb.add_scalar("val_loss/lawa", lawa_loss, record["step"])
                self.tb.flush()
            logger.info(format_eval_line(record))
        return True

    def export_best(self) -> None:
        """The best LAWA average as a Hugging Face folder (consolidated by the main rank)."""
        if self.is_main:
            from models.hf import export, run_tokenizer

            best = slots.committed_steps(self.paths.lawa_best)
            if best:
                export(consolidate(slots.slot_path(self.paths.lawa_best, best[-1])), self.model_config,
                       self.paths.lawa_best_hf, run_tokenizer(self.run_dir))
                logger.info(f"exported the best LAWA average (step {best[-1]}) to {self.paths.lawa_best_hf}")
        dist.barrier(group=self.par.ctrl_group)

    def _task_scores(self) -> dict[str, dict[str, float]]:
        """Collective: each data-parallel rank scores its share of every task's examples."""
        if not self.tasks:
            return {}
        from averaging.zero_shot import evaluate_task, summarize

        def log_probs(x: torch.Tensor) -> torch.Tensor:
            logits, _ = self.engine(x)  # (1, T, V/tp): this rank's slice of the vocabulary
            if self.par.tp > 1:
                parts = [torch.empty_like(logits) for _ in range(self.par.tp)]
                dist.all_gather(parts, logits.contiguous(), group=self.par.tp_group)
                logits = torch.cat(parts, dim=-1)
            return torch.log_softmax(logits.float(), dim=-1)

        scores = {}
        self.engine.eval()
        with torch.no_grad():
            for task in self.tasks:
                sums = evaluate_task(task, log_probs, self.encode, self.model_config.block_size, self.device,
                                     (self.par.dp_rank, self.par.dp))
                # Tensor-parallel ranks of one data-parallel rank scored the same examples: count once.
                gathered = self._gather(sums if self.par.tp_rank == 0 else None)
                total = {k: sum(g[k] for g in gathered if g is not None) for k in sums}
                scores[task.name] = summarize(task, total)
        return scores

    def _loss(self) -> float:
        return validation_loss(self.engine, self.val, self.device, self.par.dp_group, self.par.dp)

    def _save_best(self, averaged: list[torch.Tensor], model_states: dict, newest: slots.SlotManifest,
                   steps: list[int], loss: float) -> None:
        """Collective: every rank writes its shard, then one rank (of the whole group: the run
        directory is shared by all nodes) commits the slot and drops the previous best."""
        path = slots.slot_path(self.paths.lawa_best, newest.step)
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
                ds_version=newest.ds_version, steps_averaged=steps, val_loss=loss))
            for step, old, _ in slots.list_slots(self.paths.lawa_best):
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
