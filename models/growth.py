"""Depthwise model growth (Du et al. 2024, "Stacking Your Transformers", Gstack): a trained model of
L blocks becomes one of g·L blocks whose blocks are copies of the trained ones; embeddings, final
norm and head are reused as they are.

Two orders:
  stack        the whole trained stack repeated g times: block i <- block i mod L (Gstack's operator)
  interpolate  each trained block repeated g times in place: block i <- block i // g

Works on full (consolidated) state dicts of either family; the grown run loads the result into its
own data × tensor-parallel layout like any other initial weights (launcher/checkpoint.load_weights).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal

import torch

from models.registry import ModelConfig

Order = Literal["stack", "interpolate"]
ORDERS = typing.get_args(Order)
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def source_block(i: int, n_layer: int, factor: int, order: str) -> int:
    """Which trained block grown block i copies."""
    if order == "stack":
        return i % n_layer
    if order == "interpolate":
        return i // factor
    raise ValueError(f"growth order must be one of {', '.join(ORDERS)}, got {order!r}")


def grow(state_dict: dict[str, torch.Tensor], config: ModelConfig, factor: int,
         order: str = "stack") -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The grown model's full state dict and config (n_layer × factor, all else equal)."""
    if factor < 1:
        raise ValueError(f"growth factor must be >= 1, got {factor}")
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    grown: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = BLOCK.match(name)
        if match:
            blocks.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        else:
            grown[name] = tensor.clone()
    if sorted(blocks) != list(range(config.n_layer)):
        raise ValueError(f"the state dict has blocks {sorted(blocks)}, its config says {config.n_layer}")
    for i in range(config.n_layer * factor):
        for suffix, tensor in blocks[source_block(i, config.n_layer, factor, order)].items():
            grown[f"blocks.{i}.{suffix}"] = tensor.clone()
    return grown, dataclasses.replace(config, n_layer=config.n_layer * factor)
