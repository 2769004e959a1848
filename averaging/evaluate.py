"""Validation loss over a fixed held-out set, shared by the trainer and the LAWA sidecar so that raw
and averaged weights are scored by the same code on the same tokens."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from core.config import need


@dataclass
class EvalArgs:
    every: int = 100  # validation loss every this many steps, and at the end; 0: only at the end
    batches: int = 8  # micro-batches of held-out data per data-parallel rank
    tasks: list[str] = field(default_factory=list)  # zero-shot task files the sidecar scores at each commit
    task_limit: int = 0  # first N examples of each task; 0: all

    def validate(self) -> None:
        need(self.every >= 0, f"eval.every: must be >= 0, got {self.every}")
        need(self.batches > 0, f"eval.batches: must be positive, got {self.batches}")
        for i, task in enumerate(self.tasks):
            need(os.path.isfile(task), f"eval.tasks[{i}]: no such file: {task}")
        need(self.task_limit >= 0, f"eval.task_limit: must be >= 0, got {self.task_limit}")


@torch.no_grad()
def validation_loss(model, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                    dp_group: dist.ProcessGroup, dp_size: int) -> float:
    """Mean loss over this rank's batches, averaged over the data-parallel group (every rank holds
    the same number of batches). Collective over the group; `model` may be a DeepSpeed engine."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        _, loss = model(x.to(device, torch.long), y.to(device, torch.long))
        total += loss.item()
    if was_training:
        model.train()
    mean = torch.tensor([total / len(batches)], dtype=torch.float64, device=device)
    dist.all_reduce(mean, group=dp_group)
    return mean.item() / dp_size


@torch.no_grad()
def hf_held_out_loss(run_dir: str, folder: str) -> float:
    """The held-out loss transformers computes for an exported Hugging Face folder, on the sidecar's
    held-out batches and averaged as the sidecar averages (per data-parallel rank, then the mean):
    the check that an export computes what the sidecar scored."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from averaging.sidecar.protocol import read_val_batches
    from core.run_dir import RunDir

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    per_rank, dp_rank = [], 0
    while os.path.isfile(RunDir(run_dir).val_batches(dp_rank)):
        batches = read_val_batches(run_dir, dp_rank)
        losses = [F.cross_entropy(model(x.long()).logits.flatten(0, 1), y.long().flatten()).item() for x, y in batches]
        per_rank.append(sum(losses) / len(losses))
        dp_rank += 1
    return sum(per_rank) / len(per_rank)
