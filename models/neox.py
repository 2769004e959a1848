"""GPT-NeoX family (the Pythia models) built from the same Megatron-style tensor-parallel layers as GPT-2.

Differences from models/gpt.py: rotary position embeddings on the first `rotary_pct` of each head's
dimensions (no learned positions), attention and MLP computed in parallel from the same input
(`x + attn(ln_1(x)) + mlp(ln_2(x))`), exact GELU, and an output head separate from the token
embedding. The fused q|k|v projection keeps GPT-NeoX's own row order — head by head, each head's
q, k and v together — so a contiguous split over tensor-parallel ranks gives each rank whole heads,
and weights map one to one onto Hugging Face's `GPTNeoXForCausalLM`.

The model sets up no process groups: it takes the tensor-parallel group it is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.tensor_parallel import (
    ColumnParallelLinear,
    Group,
    RowParallelLinear,
    VocabParallelEmbedding,
    check_split,
    group_size,
    vocab_parallel_cross_entropy,
)


@dataclass
class NeoXConfig:
    family: ClassVar[str] = "neox"
    vocab_size: int = 50304  # Pythia's embedding rows (the tokenizer has 50277 tokens)
    block_size: int = 2048
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    rotary_pct: float = 0.25  # fraction of each head's dimensions that rotate
    rotary_base: float = 10000.0
    parallel_residual: bool = True
    bias: bool = True
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0
    init_std: float = 0.02

    def check(self, tp: int = 1, prefix: str = "", tp_name: str = "the tensor-parallel size") -> None:
        check_split(self.n_embd, self.n_head, self.vocab_size, tp, prefix, tp_name)
        head_dim = self.n_embd // self.n_head
        rotary = int(head_dim * self.rotary_pct)
        if rotary % 2 != 0:
            raise ValueError(f"{prefix}n_embd/{prefix}n_head: a {head_dim}-dim head rotates {rotary} dims "
                             f"({self.rotary_pct:.0%}), which must be even")


# The Pythia suite's shapes (Biderman et al. 2023, table 1), and small test sizes.
NEOX_SIZES: dict[str, dict[str, int]] = {
    "pythia-70m": dict(n_layer=6, n_head=8, n_embd=512),
    "pythia-160m": dict(n_layer=12, n_head=12, n_embd=768),
    "pythia-410m": dict(n_layer=24, n_head=16, n_embd=1024),
    "pythia-1b": dict(n_layer=16, n_head=8, n_embd=2048),
    "pythia-1.4b": dict(n_layer=24, n_head=16, n_embd=2048),
    "pythia-2.8b": dict(n_layer=32, n_head=32, n_embd=2560),
    "pythia-6.9b": dict(n_layer=32, n_head=32, n_embd=4096),
    "pythia-12b": dict(n_layer=36, n_head=40, n_embd=5120),
    "neox-tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "neox-micro": dict(n_layer=2, n_head=2, n_embd=32),
}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """cos/sin tables for the rotating dimensions, computed for the sequence at hand."""

    def __init__(self, rotary_dims: int, base: float):
        super().__init__()
        self.rotary_dims = rotary_dims
        self.base = base

    def forward(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.rotary_dims, 2, device=device).float() / self.rotary_dims))
        freqs = torch.outer(torch.arange(T, device=device).float(), inv_freq)  # (T, rd/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, rd)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (B, nh, T, hd); the rest pass through."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    rot = rot * cos.to(x.dtype) + rotate_half(rot) * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1)


class NeoXAttention(nn.Module):
    def __init__(self, config: NeoXConfig, tp_group: Group):
        super().__init__()
        tp = group_size(tp_group)
        self.n_head = config.n_head // tp  # heads on this rank
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.rotary = Rotary(int(self.head_dim * config.rotary_pct), config.rotary_base)
        self.qkv = ColumnParallelLinear(config.n_embd, 3 * config.n_embd, config.bias, config.init_std, tp_group)
        self.proj = RowParallelLinear(config.n_embd, config.n_embd, config.bias,
                                      config.init_std / math.sqrt(2 * config.n_layer), tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head, 3 * self.head_dim).transpose(1, 2)  # (B, nh, T, 3·hd)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, nh, T, hd)
        cos, sin = self.rotary(T, x.device)  # (T, rd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C/tp)
        return self.proj(y)  # (B, T, C)


class NeoXMLP(nn.Module):
    def __init__(self, config: NeoXConfig, tp_group: Group):
        super().__init__()
        self.up = ColumnParallelLinear(config.n_embd, 4 * config.n_embd, config.bias, config.init_std, tp_group)
        self.down = RowParallelLinear(4 * config.n_embd, config.n_embd, config.bias,
                                      config.init_std / math.sqrt(2 * config.n_layer), tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (B, T, 4C/tp) -> (B, T, C)


class NeoXBlock(nn.Module):
    def __init__(self, config: NeoXConfig, tp_group: Group):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = NeoXAttention(config, tp_group)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = NeoXMLP(config, tp_group)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel_residual:
            return x + self.drop(self.attn(self.ln_1(x))) + self.drop(self.mlp(self.ln_2(x)))  # (B, T, C)
        x = x + self.drop(self.attn(self.ln_1(x)))  # (B, T, C)
        return x + self.drop(self.mlp(self.ln_2(x)))  # (B, T, C)


class NeoX(nn.Module):
    def __init__(self, config: NeoXConfig, tp_group: Group = None):
        super().__init__()
        config.check(group_size(tp_group))
        self.config = config
        self.tp_group = tp_group
        self.checkpoint_blocks = False  # recompute activations in backward (set by the trainer: train.activation_checkpointing)
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, config.init_std, tp_group)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(NeoXBlock(config, tp_group) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        # Untied output head, split over the vocabulary like the embedding.
        self.head = ColumnParallelLinear(config.n_embd, config.vocab_size, False, config.init_std, tp_group)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, V/tp) for this rank's vocab slice, mean loss or None).
        keep (B, T) bool: only those positions go through the output head, logits (N, V/tp)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.drop(self.wte(idx))  # (B, T, C)
        for block in self.blocks:
            # Activation checkpointing: keep only each block's input, recompute the rest in backward.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.head(x if keep is None else x[keep])  # (B, T, V/tp), or (N, V/tp)
        if targets is None:
            return logits, None
        loss = vocab_parallel_cross_entropy(logits, targets, self.wte.vocab_start, self.tp_group)
        return logits, loss


def count_neox_parameters(config: NeoXConfig) -> int:
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    per_block = 2 * 2 * C + 3 * C * C + 3 * C * b + C * C + C * b + 4 * C * C + 4 * C * b + 4 * C * C + C * b
    return 2 * V * C + L * per_block + 2 * C
