"""Validation loss over a fixed held-out set, shared by the trainer and the LAWA sidecar so that raw
and averaged weights are scored by the same code on the same tokens."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from core.config import FilePath, need


@dataclass
class EvalArgs:
    every: int = 100  # validation loss every this many steps, and at the end; 0: only at the end
    batches: int = 8  # micro-batches of held-out data per data-parallel rank
    # Scored by the sidecar through lm-evaluation-harness (averaging/harness.py) on raw, every merge
    # and EMA/SWA: .jsonl files in the two formats there, and the harness's task names.
    tasks: list[FilePath] = field(default_factory=list)
    harness_tasks: list[str] = field(default_factory=list)  # your YAMLs' names (harness_include), or the harness's
    harness_include: Optional[FilePath] = None  # a folder of your task YAMLs
    task_limit: int = 0  # first N examples of each task; 0: all
    task_every: int = 0  # score the tasks at slots whose step is a multiple of this; 0: every slot scored

    def validate(self) -> None:
        need(self.every >= 0, f"eval.every: must be >= 0, got {self.every}")
        need(self.batches > 0, f"eval.batches: must be positive, got {self.batches}")
        for i, task in enumerate(self.tasks):
            need(os.path.isfile(task), f"eval.tasks[{i}]: no such file: {task}")
        need(self.harness_include is None or os.path.isdir(self.harness_include),
             f"eval.harness_include: no such folder: {self.harness_include}")
        need(self.task_limit >= 0, f"eval.task_limit: must be >= 0, got {self.task_limit}")
        need(self.task_every >= 0, f"eval.task_every: must be >= 0, got {self.task_every}")

    @property
    def all_tasks(self) -> list[str]:
        return [*self.tasks, *self.harness_tasks]


@dataclass
class HeldOut:
    """One data-parallel rank's held-out batches, source by source (every rank holds the same number
    of each source's batches). The windows depend on the data only: runs of any mixture or seed on
    the same data dir are scored on the same tokens."""
    names: list[str]  # the sources' names
    weights: list[float]  # the run's mixture (sums to 1): the overall loss is this mean of the sources'
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per source: (B, T) inputs, (B, T) targets


@dataclass
class HeldOutLoss:
    overall: float  # the mixture's held-out loss: the sources' losses weighted by the run's mixture
    by_source: dict[str, float]  # empty for a single source (it is the overall loss)


def mixture_mean(by_source: list[float], weights: list[float]) -> float:
    """The sources' losses weighted by the mixture (a source held out only, weight 0, counts nowhere)."""
    inside = [(loss, w) for loss, w in zip(by_source, weights) if w > 0]
    return sum(loss * w for loss, w in inside) / sum(w for _, w in inside)


@torch.no_grad()
def validation_loss(model, held_out: HeldOut, device: torch.device, dp_group: dist.ProcessGroup,
                    dp_size: int) -> HeldOutLoss:
    """Each source's mean loss over its batches, averaged over the data-parallel group, and their
    mixture-weighted mean. Collective over the group; `model` may be a DeepSpeed engine."""
    was_training = model.training
    model.eval()
    means = []
    for batches in held_out.batches:
        total = 0.0
        for x, y in batches:
            _, loss = model(x.to(device, torch.long), y.to(device, torch.long))
            total += loss.item()
        means.append(total / len(batches))
    if was_training:
        model.train()
    mean = torch.tensor(means, dtype=torch.float64, device=device)
    dist.all_reduce(mean, group=dp_group)
    by_source = [v / dp_size for v in mean.tolist()]
    return HeldOutLoss(mixture_mean(by_source, held_out.weights),
                       dict(zip(held_out.names, by_source)) if len(by_source) > 1 else {})


@torch.no_grad()
def single_process_held_out_loss(logits: Callable[[torch.Tensor], torch.Tensor],
                                 held_out_by_rank: list[HeldOut]) -> float:
    """The held-out loss of a model in one process (`logits`: token ids (B, T) -> (B, T, V)) on the
    sidecar's held-out batches (every data-parallel rank's: averaging.sidecar.protocol.read_every_val_batches),
    averaged as the sidecar averages (per rank, then the mean); cross-entropy in fp32, as the model's own."""
    import torch.nn.functional as F

    per_rank = []
    for held_out in held_out_by_rank:
        sources = []
        for batches in held_out.batches:
            losses = [F.cross_entropy(logits(x.long()).float().flatten(0, 1), y.long().flatten()).item()
                      for x, y in batches]
            sources.append(sum(losses) / len(losses))
        per_rank.append(sources)
    names, weights = held_out_by_rank[0].names, held_out_by_rank[0].weights
    by_source = [sum(rank[i] for rank in per_rank) / len(per_rank) for i in range(len(names))]
    return mixture_mean(by_source, weights)


def hf_held_out_loss(held_out_by_rank: list[HeldOut], folder: str, dtype: torch.dtype = torch.float32) -> float:
    """The held-out loss transformers computes for an exported Hugging Face folder, its weights and
    activations in `dtype` (bf16: as the sidecar scores on a GPU): the check that an export computes
    what the sidecar scored."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    return single_process_held_out_loss(lambda x: model(x).logits, held_out_by_rank)
