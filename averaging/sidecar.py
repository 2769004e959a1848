"""The LAWA sidecar: a process group beside the trainers that averages ZeRO-3 shards in place.

One sidecar rank per training rank, in the same TP x DP layout, with its own rendezvous. When a
new snapshot slot is committed, each rank reads *its own* shard of the latest k committed slots
(spaced `lawa.spacing` steps apart), averages them element-wise in fp32, loads the averaged
partitions straight into its ZeRO-3 parameters (nothing is consolidated on any rank) and the group
evaluates the raw latest slot and the average on the trainer's held-out set. Results go to
`eval.jsonl` in the run directory; the best average is kept as a committed slot in `lawa_best/`.

Started by the trainer (`sidecar.enabled: true`), or by hand on a run directory with the training
layout:

    torchrun --nproc_per_node 2 -m averaging.sidecar --run-dir runs/tiny_cpu --once
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from averaging import slots
from averaging.evaluate import validation_loss
from averaging.averages import KINDS
from averaging.lawa import average_shards, select_spaced
from launcher.distributed import exit_process

SPEC_FILE = os.path.join("sidecar", "spec.json")
DONE_FILE = os.path.join("sidecar", "training_done.json")
EVAL_FILE = "eval.jsonl"
BEST_DIR = "lawa_best"
HF_BEST_DIR = "lawa_best_hf"
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class SidecarArgs:
    enabled: bool = False  # start the sidecar beside the trainers (needs snapshot.every > 0)
    device: str = "auto"  # where the sidecar averages and evaluates: cpu, cuda, or auto (training's)
    poll_seconds: float = 0.5  # how often it looks for newly committed slots
    restarts: int = 2  # how many times the trainers restart a crashed sidecar
    port_offset: int = 1  # its rendezvous port: training's MASTER_PORT + this (+ restart count)
    exit_timeout_s: float = 900.0  # at the end of training, how long to wait for its last evaluation
    export_hf: bool = False  # at the end of training, export the best LAWA average to <run_dir>/lawa_best_hf


# ---------------------------------------------------------------------------------------------
# files shared with the trainer


def val_file(run_dir: str, dp_rank: int) -> str:
    return os.path.join(run_dir, "sidecar", f"val_dp{dp_rank}.pt")


def write_spec(run_dir: str, spec: dict[str, Any]) -> None:
    os.makedirs(os.path.join(run_dir, "sidecar"), exist_ok=True)
    slots.write_file_atomic(os.path.join(run_dir, SPEC_FILE), json.dumps(spec, indent=1).encode())


def write_val_batches(run_dir: str, dp_rank: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    os.makedirs(os.path.join(run_dir, "sidecar"), exist_ok=True)
    tensors = [(x.to(torch.int32), y.to(torch.int32)) for x, y in batches]
    slots.write_file_atomic(val_file(run_dir, dp_rank), slots.serialize(tensors))


def mark_training_done(run_dir: str, last_snapshot_step: Optional[int], final_step: int) -> None:
    slots.write_file_atomic(os.path.join(run_dir, DONE_FILE),
                            json.dumps({"last_snapshot_step": last_snapshot_step, "final_step": final_step}).encode())


def clear_training_done(run_dir: str) -> None:
    try:
        os.remove(os.path.join(run_dir, DONE_FILE))
    except FileNotFoundError:
        pass


def _training_done(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, DONE_FILE)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_eval_log(run_dir: str) -> list[dict[str, Any]]:
    """Records of eval.jsonl; a step evaluated twice (after a restart) keeps its last record."""
    path = os.path.join(run_dir, EVAL_FILE)
    if not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def read_new_eval_records(run_dir: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Records appended to eval.jsonl since byte `offset`, and the new offset (whole lines only)."""
    path = os.path.join(run_dir, EVAL_FILE)
    if not os.path.isfile(path):
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def format_eval_line(r: dict[str, Any]) -> str:
    steps = ",".join(str(s) for s in r["steps_averaged"])
    others = "".join(f", {kind.upper()} {r[f'{kind}_val_loss']:.4f}" for kind in KINDS if f"{kind}_val_loss" in r)
    tasks = r.get("tasks", {})
    scores = "".join(f"; {name} acc raw {tasks['raw'][name]['acc']:.3f} LAWA {tasks['lawa'][name]['acc']:.3f}"
                     for name in tasks.get("lawa", {}))
    return (f"lawa | step {r['step']}: raw val {r['raw_val_loss']:.4f}, averaged {r['lawa_val_loss']:.4f} "
            f"(k={r['k']}: {steps}){others}{scores}")


def format_eval_table(records: list[dict[str, Any]]) -> str:
    kinds = [kind for kind in KINDS if any(f"{kind}_val_loss" in r for r in records)]
    lines = ["| step | raw val loss | LAWA val loss | LAWA - raw | k |" + "".join(f" {k.upper()} val loss |" for k in kinds),
             "|---:|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for r in records:
        extra = "".join(f" {r[f'{k}_val_loss']:.4f} |" if f"{k}_val_loss" in r else " |" for k in kinds)
        lines.append(f"| {r['step']} | {r['raw_val_loss']:.4f} | {r['lawa_val_loss']:.4f} | "
                     f"{r['lawa_val_loss'] - r['raw_val_loss']:+.4f} | {r['k']} |" + extra)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the sidecar's model: ZeRO-3 partitions that snapshots are loaded into


def inference_config(training_config: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """Training's DeepSpeed config, minus the optimizer, with every parameter partitioned: a
    parameter kept whole ("persistent") would not see new partitions loaded under it."""
    config = {k: v for k, v in training_config.items() if k not in ("zero_allow_untested_optimizer",)}
    zero = dict(config.get("zero_optimization", {}))
    zero.update({"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
    config["zero_optimization"] = zero
    config["bf16"] = {"enabled": bf16}
    return config


def load_partitions(params: dict[str, torch.nn.Parameter], flat_groups: list[torch.Tensor],
                    param_shapes: list[dict[str, Any]], dp: int) -> None:
    """Copy each parameter's partition out of the flat groups into its ZeRO-3 local shard."""
    for name, part in slots.split_partitions(flat_groups, param_shapes, dp).items():
        p = params.get(name)
        if p is None:
            raise slots.LayoutMismatch(f"snapshot parameter {name} is not in the model")
        if p.ds_tensor.numel() != part.numel():
            raise slots.LayoutMismatch(f"{name}: snapshot partition of {part.numel()} elements, model's is "
                                       f"{p.ds_tensor.numel()}")
        p.ds_tensor.data.copy_(part.view_as(p.ds_tensor))


# ---------------------------------------------------------------------------------------------
# the loop


class Sidecar:
    def __init__(self, run_dir: str, parent_pid: Optional[int]):
        self.run_dir = run_dir
        self.parent_pid = parent_pid
        with open(os.path.join(run_dir, SPEC_FILE)) as f:
            self.spec = json.load(f)
        spec = self.spec
        self.root = spec["snapshot_dir"]
        want = spec["device"]
        use_cuda = want == "cuda" or (want == "auto" and spec["training_device"] == "cuda")
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit("sidecar.device=cuda, but no GPU is visible to the sidecar")
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        from models.hf import run_model_config
        from models.registry import build_model
        from models.parallel import build_parallel

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
        expected = spec["dp"] * spec["tp"]
        if dist.get_world_size() != expected:
            raise SystemExit(f"the sidecar must run with the training layout: {expected} ranks "
                             f"(data {spec['dp']} × tensor {spec['tp']}), not {dist.get_world_size()}")
        self.par = build_parallel(spec["tp"], local_rank, self.device)
        self.is_main = self.par.rank == 0
        ds_config = inference_config(spec["deepspeed"], bf16=spec["precision"] == "bf16" and use_cuda)
        with deepspeed.zero.Init(config_dict_or_path=ds_config, data_parallel_group=self.par.dp_group,
                                 mpu=self.par):
            self.model_config = run_model_config(run_dir)
            self.model = build_model(self.model_config, self.par.tp_group)
        self.engine, *_ = deepspeed.initialize(model=self.model, config=ds_config, mpu=self.par)
        self.params = dict(self.model.named_parameters())
        self.val = torch.load(val_file(run_dir, self.par.dp_rank), weights_only=True)
        self.tasks, self.encode = [], None
        if spec.get("tasks"):
            from averaging.zero_shot import load_task
            from launcher.data import load_tokenizer
            from models.hf import run_tokenizer

            self.tasks = [load_task(path, spec.get("task_limit", 0)) for path in spec["tasks"]]
            self.encode = load_tokenizer(run_tokenizer(run_dir)).encode
        self.k, self.spacing = spec["lawa"]["k"], spec["lawa"]["spacing"]
        self.bad_steps: set[int] = set()
        done = read_eval_log(run_dir)
        self.last_step = done[-1]["step"] if done else -1
        self.best_loss = min((r["lawa_val_loss"] for r in done if r.get("best")), default=float("inf"))
        self.tb = None
        if self.is_main and spec.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard", "sidecar"))
            except ImportError:
                pass

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def say(self, message: str) -> None:
        if self.is_main:
            print(f"[sidecar] {message}", flush=True)

    def _gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.par.world_size
        dist.all_gather_object(out, value, group=self.par.ctrl_group)
        return out

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
            views = self._gather((slots.committed_steps(self.root), _training_done(self.run_dir),
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
            if done is not None and self.spec.get("export_hf"):
                self.export_best()
            if once or orphaned or done is not None:
                return
            time.sleep(self.spec["poll_seconds"])

    def evaluate(self, committed: list[int]) -> bool:
        """Average and evaluate the newest set; False when it must be chosen again."""
        chosen = select_spaced(committed, self.k, self.spacing)
        outcome: tuple = ("ok",)
        shards, manifests, model_states, others = [], [], None, {}
        start = time.perf_counter()
        try:
            for step in chosen:
                path = os.path.join(self.root, slots.slot_name(step))
                manifest = slots.read_manifest(path)
                if manifests:
                    try:
                        slots.check_compatible([manifests[0], manifest])
                    except slots.LayoutMismatch as e:
                        outcome = ("mismatch", step, str(e))
                        break
                flat, _ = slots.read_shard(path, self.par.dp_rank, self.par.tp_rank, manifest)
                if model_states is None:
                    model_states = slots.read_model_states(path, self.par.dp_rank, self.par.tp_rank, manifest)
                shards.append(flat)
                manifests.append(manifest)
            if outcome == ("ok",):
                # The trainers' EMA/SWA as of the newest step, stored in the same slot.
                step = chosen[0]  # what a corrupt file below is blamed on
                newest_path = os.path.join(self.root, slots.slot_name(step))
                for kind in manifests[0].get("averages", {}):
                    others[kind], _ = slots.read_shard(newest_path, self.par.dp_rank, self.par.tp_rank,
                                                       manifests[0], kind=kind)
        except slots.SlotVanished:
            outcome = ("vanished",)
        except slots.SlotCorrupt as e:
            outcome = ("corrupt", step, str(e))
        read_s = time.perf_counter() - start

        outcomes = self._gather(outcome)
        retry = False
        for o in outcomes:
            if o[0] == "vanished":
                retry = True
            elif o[0] in ("corrupt", "mismatch"):
                # Every rank sees the same gathered outcomes, so all exclude the same steps.
                self.bad_steps.add(o[1])
                self.say(f"leaving out step {o[1]}: {o[2]}")
                retry = True
        if retry:
            return False

        start = time.perf_counter()
        averaged = average_shards(shards) if len(shards) > 1 else shards[0]
        average_s = time.perf_counter() - start
        dp, shapes = manifests[0]["dp"], slots.shapes_from_json(manifests[0]["param_shapes"])
        task_scores = {}
        load_partitions(self.params, shards[0], shapes, dp)
        raw_loss = self._loss()
        task_scores["raw"] = self._task_scores()
        if len(shards) > 1:
            load_partitions(self.params, averaged, shapes, dp)
            lawa_loss = self._loss()
            task_scores["lawa"] = self._task_scores()
        else:
            lawa_loss = raw_loss
            task_scores["lawa"] = task_scores["raw"]
        other_losses = {}
        for kind, flat in others.items():
            load_partitions(self.params, flat, shapes, dp)
            other_losses[f"{kind}_val_loss"] = self._loss()
            task_scores[kind] = self._task_scores()
        newest = manifests[0]
        is_best = lawa_loss < self.best_loss
        if is_best:
            self.best_loss = lawa_loss
            self._save_best(averaged, model_states, newest, [m["step"] for m in manifests], lawa_loss)
        record = {
            "step": newest["step"], "tokens": newest["tokens"], "raw_val_loss": raw_loss,
            "lawa_val_loss": lawa_loss, "k": len(shards), "steps_averaged": [m["step"] for m in manifests],
            **other_losses, "averages": newest.get("averages", {}),
            **({"tasks": task_scores} if self.tasks else {}),
            "best": is_best, "read_s": read_s, "average_s": average_s,
            "bytes_averaged": sum(t.numel() * 4 for shard in shards for t in shard),
        }
        if self.is_main:
            with open(os.path.join(self.run_dir, EVAL_FILE), "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            if self.tb is not None:
                self.tb.add_scalar("val_loss/raw", raw_loss, record["step"])
                self.tb.add_scalar("val_loss/lawa", lawa_loss, record["step"])
                self.tb.flush()
            self.say(format_eval_line(record))
        return True

    def export_best(self) -> None:
        """The best LAWA average as a Hugging Face folder (consolidated by the main rank)."""
        if self.is_main:
            from averaging.consolidate import consolidate
            from models.hf import export, run_tokenizer

            best = slots.committed_steps(os.path.join(self.run_dir, BEST_DIR))
            if best:
                folder = os.path.join(self.run_dir, BEST_DIR, slots.slot_name(best[-1]))
                out = os.path.join(self.run_dir, HF_BEST_DIR)
                export(consolidate(folder), self.model_config, out + ".tmp",
                       run_tokenizer(self.run_dir))
                shutil.rmtree(out, ignore_errors=True)
                os.replace(out + ".tmp", out)
                self.say(f"exported the best LAWA average (step {best[-1]}) to {out}")
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

    def _save_best(self, averaged: list[torch.Tensor], model_states: dict, newest: dict, steps: list[int],
                   loss: float) -> None:
        root = os.path.join(self.run_dir, BEST_DIR)
        path = os.path.join(root, slots.slot_name(newest["step"]))
        files = slots.write_shard(path, self.par.dp_rank, self.par.tp_rank, averaged,
                                  {**model_states, "global_steps": newest["step"]})
        merged = {name: meta for rank_files in self._gather(files) for name, meta in rank_files.items()}
        if self.par.local_rank == 0:
            manifest = {**{k: newest[k] for k in ("step", "tokens", "lr", "dp", "tp", "param_shapes", "ds_version",
                                                  "tensor_parallel_layout") if k in newest},
                        "kind": "lawa", "steps_averaged": steps, "val_loss": loss, "files": merged}
            slots.commit(path, manifest)
            for step, old, _ in slots.list_slots(root):
                if step != newest["step"]:
                    slots.remove_slot(old)
        dist.barrier(group=self.par.ctrl_group)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="the training run's directory")
    parser.add_argument("--once", action="store_true", help="evaluate the newest committed slots once and exit")
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.run_dir, SPEC_FILE)):
        print(f"error: {args.run_dir} has no {SPEC_FILE}: is it the run directory of a job with "
              f"snapshot.every > 0?", file=sys.stderr)
        return 2
    # Slurm's warning signal reaches every process of the job step; the trainers handle it and
    # tell the sidecar when to finish (the training_done marker).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sidecar = Sidecar(args.run_dir, args.parent_pid)
    sidecar.run(args.once)
    sidecar.close()
    return 0


# ---------------------------------------------------------------------------------------------
# the trainers' side: start, watch, restart, and wait for the sidecar


class SidecarSupervisor:
    """Each training rank starts one sidecar rank beside itself; the trainers vote on liveness at
    log steps (one tiny gloo all-reduce) so that all restart the whole sidecar group together."""

    def __init__(self, args: SidecarArgs, run_dir: str, rank: int, world_size: int, local_rank: int,
                 master_addr: str, master_port: int, ctrl_group: dist.ProcessGroup, log):
        self.args, self.run_dir, self.ctrl_group, self.log = args, run_dir, ctrl_group, log
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.master_addr, self.master_port = master_addr, master_port
        self.generation = 0
        self.proc: Optional[subprocess.Popen] = None
        self._start()

    def _start(self) -> None:
        env = dict(os.environ)
        env.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
                   MASTER_ADDR=self.master_addr,
                   MASTER_PORT=str(self.master_port + self.args.port_offset + self.generation),
                   PYTHONUNBUFFERED="1")
        # torchrun's variables would make the sidecar join the trainers' rendezvous store
        # (TORCHELASTIC_USE_AGENT_STORE) instead of hosting its own.
        for var in [v for v in env if v.startswith("TORCHELASTIC_")] + ["GROUP_RANK", "ROLE_RANK", "ROLE_NAME"]:
            env.pop(var, None)
        log_path = os.path.join(self.run_dir, "sidecar", f"rank{self.rank}.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "averaging.sidecar", "--run-dir", self.run_dir, "--parent-pid", str(os.getpid())],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=os.getcwd())
        if self.rank == 0:
            self.log(f"sidecar started (generation {self.generation}, pid {self.proc.pid}); log: {log_path}")

    def check(self) -> bool:
        """Collective. Restarts the group if any rank's sidecar died; False once out of restarts."""
        alive = torch.tensor([int(self.proc is not None and self.proc.poll() is None)], dtype=torch.int64)
        dist.all_reduce(alive, op=dist.ReduceOp.MIN, group=self.ctrl_group)
        if alive.item() == 1 or self.proc is None:
            return self.proc is not None
        code = self.proc.poll()
        if self.generation >= self.args.restarts:
            self.log(f"sidecar stopped (exit code {code} on rank {self.rank} or another rank) and "
                     f"sidecar.restarts={self.args.restarts} is used up; training goes on without it")
            self.stop()
            self.proc = None
            return False
        self.log(f"sidecar died (see {self.run_dir}/sidecar/rank*.log); restarting it, training goes on")
        self.stop()
        self.generation += 1
        self._start()
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def wait(self, timeout_s: float) -> Optional[int]:
        """At the end of training: let the sidecar finish its last evaluation."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.log(f"sidecar still busy after {timeout_s:.0f}s; stopping it")
            self.stop()
            return None


if __name__ == "__main__":
    exit_process(main())
