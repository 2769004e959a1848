"""Model families by name: a named size picks the family, its config class and its module.

`model.size` in a job is a key of `SIZES` (gpt2-125m, tiny, pythia-160m, neox-tiny, ...); configs
travel between processes (the sidecar's spec) as plain dicts carrying their family.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch.nn as nn

from core.config import ConfigError, need
from core.files import write_json_atomic
from models.gpt import GPT, GPT_SIZES, GPTConfig
from models.gpt import count_parameters as count_gpt_parameters
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


def write_model_config(path: str, config: ModelConfig) -> None:
    """A run's model.json: what export tools and the sidecar rebuild the model from."""
    write_json_atomic(path, config_to_dict(config))


def read_model_config(path: str) -> ModelConfig:
    with open(path) as f:
        return config_from_dict(json.load(f))


@dataclass
class ModelArgs:
    size: str = "tiny"  # a named shape (SIZES: GPT-2 or Pythia/GPT-NeoX); the fields below override it
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary rounded up to a multiple of 64
    block_size: Optional[int] = None  # None: data.seq_len
    bias: bool = True
    dropout: float = 0.0
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 only: block i's attention scores also / (i + 1)

    def validate(self, tp: int = 1) -> None:
        """The model section, for a tensor-parallel size `tp` (parallel.tensor)."""
        need(self.size in SIZES, f"model.size: unknown size '{self.size}' (known: {', '.join(SIZES)})")
        need(not self.scale_attn_by_inverse_layer_idx or family_of(self.size) == "gpt2",
             f"model.scale_attn_by_inverse_layer_idx: a GPT-2 option; {self.size} is a {family_of(self.size)} model")
        for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, key)
            need(value is None or value > 0, f"model.{key}: must be positive, got {value}")
        need(0.0 <= self.dropout < 1.0, f"model.dropout: must be in [0, 1), got {self.dropout}")
        # The vocabulary may come from the tokenizer later: check the shape with one that splits.
        self._check(self.config(self.vocab_size or 64 * tp, self.block_size or 1), tp)

    def config(self, vocab_size: int, block_size: int) -> ModelConfig:
        return model_config(self.size, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                            vocab_size=vocab_size, block_size=block_size, bias=self.bias, dropout=self.dropout,
                            scale_attn_by_inverse_layer_idx=self.scale_attn_by_inverse_layer_idx or None)

    def resolve(self, tokenizer_vocab: int, seq_len: int, tp: int = 1) -> ModelConfig:
        """The model config, once the tokenizer's vocabulary is known."""
        vocab = self.vocab_size if self.vocab_size is not None else -(-tokenizer_vocab // 64) * 64
        need(vocab >= tokenizer_vocab,
             f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})")
        config = self.config(vocab, self.block_size if self.block_size is not None else seq_len)
        self._check(config, tp)
        return config

    @staticmethod
    def _check(config: ModelConfig, tp: int) -> None:
        try:
            config.check(tp, prefix="model.", tp_name="parallel.tensor")
        except ValueError as e:
            raise ConfigError(str(e)) from None
