"""Helpers that several test modules share: the job arguments of the common small runs, and the
single-process references their results are checked against."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import read_metrics


def smoke(data_dir: str, run_dir: Path, *extra: str) -> list[str]:
    """The smoke job on `data_dir`, its ring in the run directory."""
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run_dir}",
            f"snapshot.dir={run_dir / 'snaps'}", *extra]


def single_process_val_losses(run_dir: Path, state_dict: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The reference: the consolidated model in one process, on the same held-out windows: the
    mixture's loss and each source's."""
    from averaging.evaluate import mixture_mean
    from averaging.sidecar.protocol import read_val_batches
    from models.registry import build_model, read_model_config

    spec = json.loads((run_dir / "sidecar/spec.json").read_text())
    model = build_model(read_model_config(str(run_dir / "model.json"))).eval()
    model.load_state_dict(state_dict)
    per_rank = []
    with torch.no_grad():
        for dp_rank in range(spec["dp"]):
            held_out = read_val_batches(str(run_dir), dp_rank)
            per_rank.append([sum(model(x.long(), y.long())[1].item() for x, y in batches) / len(batches)
                             for batches in held_out.batches])
    by_source = [sum(rank[i] for rank in per_rank) / len(per_rank) for i in range(len(held_out.names))]
    return mixture_mean(by_source, held_out.weights), dict(zip(held_out.names, by_source))


def single_process_val_loss(run_dir: Path, state_dict: dict[str, torch.Tensor]) -> float:
    return single_process_val_losses(run_dir, state_dict)[0]


def hf_val_loss(run: Path, folder: Path) -> float:
    """The held-out loss transformers gives an exported folder, on the run's own held-out windows."""
    from averaging.evaluate import hf_held_out_loss
    from averaging.sidecar.protocol import read_every_val_batches

    return hf_held_out_loss(read_every_val_batches(str(run)), str(folder))


def tiny(data_dir: str, run_dir: Path, steps: int) -> list[str]:
    """The 770M preset's overrides that shrink it to a tiny CPU job (the Slurm tests)."""
    return [f"data.dir={data_dir}", f"run_dir={run_dir}", f"snapshot.dir={run_dir / 'snaps'}",
            "model.size=micro", "model.vocab_size=4096", "model.block_size=64", "data.seq_len=64",
            "data.vocab_size=4096", "data.val_fraction=0.05", "train.global_batch_size=8", "train.micro_batch_size=2", f"train.steps={steps}",
            "train.precision=fp32", "schedule.warmup_steps=2", "optimizer.lr=3e-3", "snapshot.every=4",
            "lawa.spacing=4", "lawa.k=3", "eval.every=10", "eval.batches=2", "checkpoint.every=10",
            "logging.every=1", "sidecar.poll_seconds=0.2"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
