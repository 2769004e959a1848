"""Depthwise model growth (Du et al. 2024, "Stacking Your Transformers", Gstack): a trained model of
L blocks becomes one of g·L blocks whose blocks are copies of the trained ones; embeddings, final
norm and head are reused as they are.

Two orders:
  stack        the whole trained stack repeated g times: block i <- block i mod L (Gstack's operator)
  interpolate  each trained block repeated g times in place: block i <- block i // g

Works on either family, as a lazy view of the trained weights (`Grown`, a TensorSource: each rank of
the grown run reads only the pieces it holds, launcher/start.load_weights) or on full state dicts.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal, Optional

import torch

from core.zero_folder import StateDictSource, TensorSource
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


class Grown(TensorSource):
    """The grown model's weights, tensor by tensor, as names of the trained model's: nothing is
    copied until a tensor (or one rank's piece of it) is asked for."""

    def __init__(self, source: TensorSource, config: ModelConfig, factor: int, order: str = "stack"):
        if factor < 1:
            raise ValueError(f"growth factor must be >= 1, got {factor}")
        self.source = source
        self.config = dataclasses.replace(config, n_layer=config.n_layer * factor)
        blocks: dict[int, list[str]] = {}
        self.origin: dict[str, str] = {}  # grown name -> trained name
        for name in source.names():
            match = BLOCK.match(name)
            if match:
                blocks.setdefault(int(match.group(1)), []).append(match.group(2))
            else:
                self.origin[name] = name
        if sorted(blocks) != list(range(config.n_layer)):
            raise ValueError(f"the source has blocks {sorted(blocks)}, its config says {config.n_layer}")
        for i in range(self.config.n_layer):
            j = source_block(i, config.n_layer, factor, order)
            self.origin.update((f"blocks.{i}.{suffix}", f"blocks.{j}.{suffix}") for suffix in blocks[j])

    def names(self) -> list[str]:
        return list(self.origin)

    def shape(self, name: str) -> torch.Size:
        return self.source.shape(self.origin[name])

    def tensor(self, name: str) -> torch.Tensor:
        return self.source.tensor(self.origin[name]).clone()

    def flat_range(self, name: str, split: Optional[list[int]], tp_rank: int, tp: int, start: int,
                   stop: int) -> torch.Tensor:
        return self.source.flat_range(self.origin[name], split, tp_rank, tp, start, stop)


def grow(state_dict: dict[str, torch.Tensor], config: ModelConfig, factor: int,
         order: str = "stack") -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The grown model's full state dict and config (n_layer × factor, all else equal)."""
    grown = Grown(StateDictSource(state_dict), config, factor, order)
    return grown.state_dict(), grown.config
