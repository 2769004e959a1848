"""Every file and folder of a run directory, named in one place.

    <run_dir>/config.yaml              the resolved job config (every key, defaults filled in)
             deepspeed_config.json     the DeepSpeed config generated from it
             model.json                the model config: what export tools rebuild the model from
             tokenizer/                the tokenizer the run trains with (a copy: the run stands alone)
             metrics.jsonl             the trainer's records (step, loss, lr, tokens/s, val loss, events)
             eval.jsonl                the sidecar's records (raw vs averaged losses per snapshot)
             tensorboard/              TensorBoard events (the sidecar's under tensorboard/sidecar)
             wandb/, wandb_id          Weights & Biases' local files, and the run's W&B id (a resume continues it)
             run_id                    a random id made at the run's first start: restart slots in the ring
                                       carry it, so a ring another run left at the same path is never resumed from
             checkpoints/step_N/       full DeepSpeed checkpoints (+ run_state.json once complete)
             lawa_best/step_N/         the best of the headline merge (the first of lawa.merges), a committed slot
             merges/<name>/step_N/     the best of every other merge
             lawa_best_hf/             the same as a Hugging Face folder (sidecar.export_hf)
             branch.json               a cooldown branch's parent run and step (launcher/cooldown.py)
             sidecar/                  spec.json, held-out batches, training_done.json, per-rank logs
             logs/                     Slurm's per-rank logs and the batch script's output
             snapshots/                the snapshot ring when no node-local /dev/shm has room
             ring_base                 the private /dev/shm folder the ring uses when /dev/shm/lawa-<uid> is
                                       another user's (launcher/ring.py)
             .lock                     the live run's hold on the directory (core/run_lock.py)

Inside step folders: `run_state.json` (a checkpoint is complete), `manifest.json` + `COMMITTED`
(a slot is committed; on node-local storage also `manifest.<node>.json`, the node's part), `averages_dp{d}_tp{t}.pt` (a rank's EMA/SWA state in a checkpoint), and
`latest` beside the checkpoints (what DeepSpeed's zero_to_fp32 reads by default).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

CONFIG = "config.yaml"
DEEPSPEED_CONFIG = "deepspeed_config.json"
MODEL = "model.json"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
WANDB_ID = "wandb_id"
RUN_ID = "run_id"
CHECKPOINTS = "checkpoints"
LAWA_BEST = "lawa_best"
LAWA_BEST_HF = "lawa_best_hf"
MERGES = "merges"
BRANCH = "branch.json"
SIDECAR = "sidecar"
LOGS = "logs"
SNAPSHOTS = "snapshots"
RING_BASE = "ring_base"

# inside step folders
RUN_STATE = "run_state.json"
LATEST = "latest"
MANIFEST = "manifest.json"


def node_manifest(node: str) -> str:
    """A node's part of a node-local slot, also kept under its node's name: gathering the nodes'
    folders into one (rsync) then keeps every part's file list and checksums."""
    return f"manifest.{node}.json"


COMMITTED = "COMMITTED"


def averages_file(dp_rank: int, tp_rank: int) -> str:
    """A rank's EMA/SWA state, beside DeepSpeed's files in a checkpoint."""
    return f"averages_dp{dp_rank}_tp{tp_rank}.pt"


@dataclass(frozen=True)
class RunDir:
    path: str

    def join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def config(self) -> str:
        return self.join(CONFIG)

    @property
    def deepspeed_config(self) -> str:
        return self.join(DEEPSPEED_CONFIG)

    @property
    def model(self) -> str:
        return self.join(MODEL)

    @property
    def tokenizer(self) -> str:
        return self.join(TOKENIZER)

    @property
    def metrics(self) -> str:
        return self.join(METRICS)

    @property
    def eval_log(self) -> str:
        return self.join(EVAL)

    @property
    def tensorboard(self) -> str:
        return self.join(TENSORBOARD)

    @property
    def wandb(self) -> str:
        return self.join(WANDB)

    @property
    def wandb_id(self) -> str:
        return self.join(WANDB_ID)

    @property
    def run_id(self) -> str:
        return self.join(RUN_ID)

    def read_run_id(self) -> Optional[str]:
        """The run's id (None before its first start made one)."""
        try:
            with open(self.run_id) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    @property
    def checkpoints(self) -> str:
        return self.join(CHECKPOINTS)

    @property
    def lawa_best(self) -> str:
        return self.join(LAWA_BEST)

    def merge_best(self, name: str, headline: bool) -> str:
        """Where a merge's best-scoring average is kept: the headline's in lawa_best/."""
        return self.lawa_best if headline else self.join(MERGES, name)

    @property
    def branch(self) -> str:
        return self.join(BRANCH)

    @property
    def lawa_best_hf(self) -> str:
        return self.join(LAWA_BEST_HF)

    @property
    def logs(self) -> str:
        return self.join(LOGS)

    @property
    def snapshots(self) -> str:
        return self.join(SNAPSHOTS)

    @property
    def ring_base(self) -> str:
        return self.join(RING_BASE)

    # the sidecar's folder
    @property
    def sidecar(self) -> str:
        return self.join(SIDECAR)

    @property
    def sidecar_spec(self) -> str:
        return self.join(SIDECAR, "spec.json")

    @property
    def training_done(self) -> str:
        return self.join(SIDECAR, "training_done.json")

    def val_batches(self, dp_rank: int) -> str:
        return self.join(SIDECAR, f"val_dp{dp_rank}.pt")

    def sidecar_log(self, rank: int) -> str:
        return self.join(SIDECAR, f"rank{rank}.log")


# The default place of the snapshot ring: node-local shared memory, under a folder of this user's own
# (0700), so that no other user of the node can read the weights or plant a slot.
SHM = "/dev/shm"


def user_shm_root() -> str:
    return os.path.join(SHM, f"lawa-{os.geteuid()}")


def find_run_dir(folder: str) -> Optional[RunDir]:
    """The run directory above a checkpoint/slot folder: the first parent holding model.json."""
    path = os.path.abspath(folder)
    while path != os.path.dirname(path):
        if os.path.isfile(os.path.join(path, MODEL)):
            return RunDir(path)
        path = os.path.dirname(path)
    return None
