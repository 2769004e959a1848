"""GPT-2 family language model built from Megatron-style tensor-parallel layers.

Pre-LayerNorm blocks, GELU MLP, learned positions, embeddings tied to the output head, optional
biases, PyTorch SDPA attention. The model sets up no process groups: it takes the tensor-parallel
group it is given (None means no tensor parallelism).

Every parameter is initialised inside the constructor of the module that owns it, because under
`deepspeed.zero.Init` a module's parameters are partitioned as soon as its constructor returns.
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
    copy_to_parallel,
    group_size,
    init_normal,
    vocab_parallel_cross_entropy,
)


@dataclass
class GPTConfig:
    family: ClassVar[str] = "gpt2"
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    block_size: int = 1024  # maximum sequence length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # GPT-2's option (transformers' GPT2Config has it; the LAWA paper's recipes turn it on): the
    # attention scores of block i (0-based) are also divided by i + 1, which damps the deep blocks early.
    scale_attn_by_inverse_layer_idx: bool = False

    def check(self, tp: int = 1, prefix: str = "", tp_name: str = "the tensor-parallel size") -> None:
        check_split(self.n_embd, self.n_head, self.vocab_size, tp, prefix, tp_name)


# Named shapes: nanoGPT's GPT-2 sizes, which the LAWA paper trains, and small test sizes.
GPT_SIZES: dict[str, dict[str, int]] = {
    "gpt2-125m": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-770m": dict(n_layer=36, n_head=20, n_embd=1280),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "micro": dict(n_layer=2, n_head=2, n_embd=32),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, tp_group: Group, layer_idx: int):
        super().__init__()
        tp = group_size(tp_group)
        self.n_head = config.n_head // tp  # heads on this rank
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.scale = self.head_dim ** -0.5 / (layer_idx + 1 if config.scale_attn_by_inverse_layer_idx else 1)
        # One fused q|k|v projection; stride 3 splits q, k and v separately so each rank owns
        # whole heads of all three.
        self.qkv = ColumnParallelLinear(config.n_embd, 3 * config.n_embd, config.bias,
                                        config.init_std, tp_group, stride=3)
        # Residual projections get GPT-2's scaled init: std / sqrt(2 * n_layer).
        self.proj = RowParallelLinear(config.n_embd, config.n_embd, config.bias,
                                      config.init_std / math.sqrt(2 * config.n_layer), tp_group)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, T, n_head * head_dim)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C/tp)
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, tp_group: Group):
        super().__init__()
        self.up = ColumnParallelLinear(config.n_embd, 4 * config.n_embd, config.bias,
                                       config.init_std, tp_group)
        self.down = RowParallelLinear(4 * config.n_embd, config.n_embd, config.bias,
                                      config.init_std / math.sqrt(2 * config.n_layer), tp_group)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.up(x), approximate="tanh")  # (B, T, 4C/tp)
        return self.dropout(self.down(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, tp_group: Group, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, tp_group, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class PositionEmbedding(nn.Module):
    """Learned absolute positions, replicated on every tensor-parallel rank."""

    def __init__(self, block_size: int, n_embd: int, init_std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(block_size, n_embd))
        init_normal(self.weight, init_std)

    def forward(self, T: int) -> torch.Tensor:
        return self.weight[:T]  # (T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, tp_group: Group = None):
        super().__init__()
        config.check(group_size(tp_group))
        self.config = config
        self.tp_group = tp_group
        self.checkpoint_blocks = False  # recompute activations in backward (set by the trainer: train.activation_checkpointing)
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, config.init_std, tp_group)
        self.wpe = PositionEmbedding(config.block_size, config.n_embd, config.init_std)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, tp_group, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, keep: torch.Tensor | None = None):
        """idx (B, T) token ids -> (logits (B, T, V/tp) for this rank's vocab slice, mean loss or None).
        keep (B, T) bool: only those positions go through the output head, logits (N, V/tp) in
        row-major order (scoring needs a few positions, and the head is a large share of the work)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x = self.drop(self.wte(idx) + self.wpe(T))  # (B, T, C)
        for block in self.blocks:
            # Activation checkpointing: keep only each block's input, recompute the rest in backward.
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint_blocks and self.training else block(x)
        x = self.ln_f(x)  # (B, T, C)
        if keep is not None:
            x = x[keep]  # (N, C)
        # The output head is the token embedding, transposed (tied weights).
        logits = F.linear(copy_to_parallel(x, self.tp_group), self.wte.weight)  # (B, T, V/tp)
        if targets is None:
            return logits, None
        loss = vocab_parallel_cross_entropy(logits, targets, self.wte.vocab_start, self.tp_group)
        return logits, loss


def count_parameters(config: GPTConfig) -> int:
    """Parameters of the whole (unsplit) model, tied head counted once."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    b = 1 if config.bias else 0
    per_block = (
        2 * C * (1 + b)  # two LayerNorms
        + 3 * C * C + 3 * C * b  # qkv
        + C * C + C * b  # attention projection
        + 4 * C * C + 4 * C * b  # mlp up
        + 4 * C * C + C * b  # mlp down
    )
    return V * C + config.block_size * C + L * per_block + C * (1 + b)
