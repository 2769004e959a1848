"""Megatron-style tensor-parallel layers that take the tensor-parallel group they are given.

Why our own layers rather than megatron-core's `tensor_parallel` package: megatron-core's
`vocab_parallel_cross_entropy` and its RNG tracker read megatron's global `parallel_state`, so
using them means initialising megatron's process groups inside the model (our models take their
group from the caller instead); its layers return `(output, bias)` tuples and need a
`ModelParallelConfig`; and its releases differ between Python 3.11 and 3.12. The layers here are
the textbook conjugate pair (Shoeybi et al. 2019): identity forward / all-reduce backward before a
column-parallel layer, all-reduce forward / identity backward after a row-parallel one.

Every weight is initialised as the full matrix from the caller's RNG and then sliced, so a model
built with tensor-parallel size N holds exactly the slices of the same model built with size 1.
Each split parameter records `tensor_parallel_dim` (and `tensor_parallel_stride` for fused
weights) so that checkpoints can be merged back without guessing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core.zero_checkpoint import split_tensor

Group = Optional[dist.ProcessGroup]


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input feeds every rank's slice)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """All-reduce forward (sum the ranks' partial products); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToParallel.apply(x, group)


def reduce_from_parallel(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromParallel.apply(x, group)


def _local_slice(full: torch.Tensor, dim: int, stride: int, group: Group) -> torch.Tensor:
    size = group_size(group)
    return full if size == 1 else split_tensor(full, dim, stride, size)[group_rank(group)]


def _mark_split(p: nn.Parameter, dim: int, stride: int = 1) -> None:
    p.tensor_parallel_dim = dim
    p.tensor_parallel_stride = stride
    # DeepSpeed's gradient norm counts a parameter on every TP rank only when this is set;
    # replicated parameters are counted once (on TP rank 0).
    p.tensor_model_parallel = True


def tensor_parallel_layout(model: nn.Module) -> dict[str, list[int]]:
    """{name: [dim, stride]} of every parameter split across tensor-parallel ranks; checkpoints and
    snapshots record it so that consolidation merges mp_rank files without guessing."""
    return {name: [p.tensor_parallel_dim, p.tensor_parallel_stride] for name, p in model.named_parameters()
            if hasattr(p, "tensor_parallel_dim")}


def init_normal(weight: torch.Tensor, std: float) -> None:
    """N(0, std) in place; nothing on the meta device, where a model is built for its shapes alone
    (launcher/plan.py at every start) and torch's meta normal_ would first import its compiler (seconds)."""
    if weight.device.type != "meta":
        nn.init.normal_(weight, mean=0.0, std=std)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b, W split along its output features: each rank computes out_features/N outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float,
                 tp_group: Group = None, stride: int = 1):
        super().__init__()
        size = group_size(tp_group)
        if out_features % (size * stride) != 0:
            raise ValueError(f"{out_features} output features do not split over {size} tensor-parallel ranks")
        self.tp_group = tp_group
        full = torch.empty(out_features, in_features)
        init_normal(full, init_std)
        self.weight = nn.Parameter(_local_slice(full, 0, stride, tp_group))  # (out/N, in)
        _mark_split(self.weight, 0, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // size))
            _mark_split(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_parallel(x, self.tp_group)
        return F.linear(x, self.weight, self.bias)  # (..., out/N)


class RowParallelLinear(nn.Module):
    """y = x W^T + b, W split along its input features; the input arrives already split."""

    def __init__(self, in_features: int, out_features: int, bias: bool, init_std: float,
                 tp_group: Group = None):
        super().__init__()
        size = group_size(tp_group)
        if in_features % size != 0:
            raise ValueError(f"{in_features} input features do not split over {size} tensor-parallel ranks")
        self.tp_group = tp_group
        full = torch.empty(out_features, in_features)
        init_normal(full, init_std)
        self.weight = nn.Parameter(_local_slice(full, 1, 1, tp_group))  # (out, in/N)
        _mark_split(self.weight, 1)
        # The bias is added once, after the reduction, so it is replicated on every rank.
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_parallel(F.linear(x, self.weight), self.tp_group)  # (..., out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks; rows outside a rank's range are 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float, tp_group: Group = None):
        super().__init__()
        size = group_size(tp_group)
        if num_embeddings % size != 0:
            raise ValueError(f"vocabulary of {num_embeddings} does not split over {size} tensor-parallel ranks")
        self.tp_group = tp_group
        self.vocab_start = group_rank(tp_group) * (num_embeddings // size)
        self.vocab_end = self.vocab_start + num_embeddings // size
        full = torch.empty(num_embeddings, embedding_dim)
        init_normal(full, init_std)
        self.weight = nn.Parameter(_local_slice(full, 0, 1, tp_group))  # (V/N, C)
        _mark_split(self.weight, 0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(idx, self.weight)
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_parallel(emb, self.tp_group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over logits split on the vocabulary dim, without gathering the full logits."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, group):
        # logits: (N, V/n) fp32, target: (N,) global token ids
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)

        local_v = logits.shape[-1]
        outside = (target < vocab_start) | (target >= vocab_start + local_v)
        local_target = (target - vocab_start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        dist.all_reduce(target_logit, group=group)

        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_target, outside)
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, local_target, outside = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits[rows, local_target] -= (~outside).to(grad_logits.dtype)
        grad_logits *= grad / grad_logits.shape[0]
        return grad_logits, None, None, None


def check_split(n_embd: int, n_head: int, vocab_size: int, tp: int, prefix: str = "",
                tp_name: str = "the tensor-parallel size") -> None:
    """Heads must divide the width, and tensor-parallel ranks must get whole heads and equal slices
    of the vocabulary. Both families' configs check themselves with it: the job config (naming
    `model.*` keys and `parallel.tensor`) and every model constructor."""
    if n_embd % n_head != 0:
        raise ValueError(f"{prefix}n_embd={n_embd} is not divisible by {prefix}n_head={n_head}")
    if n_head % tp != 0:
        raise ValueError(f"{prefix}n_head={n_head} is not divisible by {tp_name}={tp}")
    if vocab_size % tp != 0:
        raise ValueError(f"{prefix}vocab_size={vocab_size} is not divisible by {tp_name}={tp}")


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 tp_group: Group = None) -> torch.Tensor:
    """Mean cross-entropy in fp32; `logits` (..., V/n) holds this rank's vocabulary slice from
    `vocab_start`, `target` (...) global token ids."""
    logits, target = logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1)
    if group_size(tp_group) == 1:
        return F.cross_entropy(logits, target)
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, tp_group)
