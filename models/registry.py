"""Model families by name: a named size picks the family, its config class and its module.

`model.size` in a job is a key of `SIZES` (gpt2-125m, tiny, pythia-160m, neox-tiny, ...); configs
travel between processes (the sidecar's spec) as plain dicts carrying their family.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import torch.nn as nn

from models.gpt import GPT, GPT_SIZES, GPTConfig, count_parameters as count_gpt_parameters
from models.neox import NEOX_SIZES, NeoX, NeoXConfig, count_neox_parameters
from models.tensor_parallel import Group

ModelConfig = Union[GPTConfig, NeoXConfig]


@dataclasses.dataclass(frozen=True)
class Family:
    config: type
    model: Callable[..., nn.Module]
    sizes: dict[str, dict[str, int]]
    count_parameters: Callable[[Any], int]


FAMILIES: dict[str, Family] = {
    "gpt2": Family(GPTConfig, GPT, GPT_SIZES, count_gpt_parameters),
    "neox": Family(NeoXConfig, NeoX, NEOX_SIZES, count_neox_parameters),
}
SIZES: dict[str, str] = {size: name for name, family in FAMILIES.items() for size in family.sizes}


def family_of(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown model size '{size}' (known: {', '.join(SIZES)})")
    return SIZES[size]


def model_config(size: str, **overrides) -> ModelConfig:
    """A named size with fields overridden (None values are ignored; a field the family lacks is an error)."""
    family = FAMILIES[family_of(size)]
    fields = {**family.sizes[size], **{k: v for k, v in overrides.items() if v is not None}}
    return family.config(**fields)


def build_model(config: ModelConfig, tp_group: Group = None) -> nn.Module:
    return FAMILIES[config.family].model(config, tp_group=tp_group)


def count_parameters(config: ModelConfig) -> int:
    """Parameters of the whole (unsplit) model."""
    return FAMILIES[config.family].count_parameters(config)


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the matmuls plus 12·L·d·T for attention (PaLM appendix B)."""
    return 6 * count_parameters(config) + 12 * config.n_layer * config.n_embd * seq_len


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return {"family": config.family, **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    fields = dict(data)
    return FAMILIES[fields.pop("family", "gpt2")].config(**fields)
