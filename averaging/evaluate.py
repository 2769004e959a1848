"""Validation loss over a fixed held-out set, shared by the trainer and the LAWA sidecar so that raw
and averaged weights are scored by the same code on the same tokens."""
from __future__ import annotations

import torch
import torch.distributed as dist


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
