"""AdamW with weight-decay groups that stay correct when ZeRO-3 has already partitioned the params."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config import need
from core.deepspeed_compat import full_shape


@dataclass
class OptimizerArgs:
    lr: float = 6e-4  # peak learning rate; the schedule scales it per step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8

    def validate(self) -> None:
        need(self.lr > 0, f"optimizer.lr: must be positive, got {self.lr}")
        need(self.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optimizer.beta1/beta2: must be in [0, 1)")
        need(self.eps > 0, f"optimizer.eps: must be positive, got {self.eps}")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and norm gains do not (as in GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if len(full_shape(p)) >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, args: OptimizerArgs, device: torch.device) -> torch.optim.Optimizer:
    # torch's fused AdamW on GPU avoids DeepSpeed's JIT-built FusedAdam (which needs a CUDA
    # toolchain at start-up); on CPU the foreach implementation is the fast one.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.lr,
        betas=(args.beta1, args.beta2),
        eps=args.eps,
        fused=fused,
    )
