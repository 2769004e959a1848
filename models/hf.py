"""Hugging Face `transformers` format: our GPT-2 / GPT-NeoX state dicts to and from
`GPT2LMHeadModel` / `GPTNeoXForCausalLM` folders (config.json + model.safetensors, or shards of it
with transformers' model.safetensors.index.json), written and read tensor by tensor.

The mapping is a table of names per family; the only reshaping is GPT-2's Conv1D, whose weights
are stored transposed (in, out). Biases our config leaves out are exported as zeros (both HF
architectures always have them), which computes the same function.

    python -m models.hf export runs/x/lawa_best/step_00002000 --out hf/x      # any slot/checkpoint/average
    python -m models.hf import hf/pythia-160m --out pythia.pt                 # -> our state dict + config
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Optional

import torch

from core import pickles
from core.files import staged
from core.run_dir import MODEL, RunDir, find_run_dir
from core.tokenizer import load_tokenizer
from core.weights import MAX_SHARD_BYTES, Weights, write_safetensors
from core.zero_folder import StateDictSource, TensorSource, ZeroFolder
from models.gpt import GPTConfig
from models.neox import NeoXConfig
from models.registry import ModelConfig, config_to_dict, read_model_config

# ours -> HF, per family; "{i}" is the block index.
GPT2_NAMES = {
    "wte.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "ln_f.weight": "transformer.ln_f.weight",
    "ln_f.bias": "transformer.ln_f.bias",
    "blocks.{i}.ln_1.weight": "transformer.h.{i}.ln_1.weight",
    "blocks.{i}.ln_1.bias": "transformer.h.{i}.ln_1.bias",
    "blocks.{i}.attn.qkv.weight": "transformer.h.{i}.attn.c_attn.weight",
    "blocks.{i}.attn.qkv.bias": "transformer.h.{i}.attn.c_attn.bias",
    "blocks.{i}.attn.proj.weight": "transformer.h.{i}.attn.c_proj.weight",
    "blocks.{i}.attn.proj.bias": "transformer.h.{i}.attn.c_proj.bias",
    "blocks.{i}.ln_2.weight": "transformer.h.{i}.ln_2.weight",
    "blocks.{i}.ln_2.bias": "transformer.h.{i}.ln_2.bias",
    "blocks.{i}.mlp.up.weight": "transformer.h.{i}.mlp.c_fc.weight",
    "blocks.{i}.mlp.up.bias": "transformer.h.{i}.mlp.c_fc.bias",
    "blocks.{i}.mlp.down.weight": "transformer.h.{i}.mlp.c_proj.weight",
    "blocks.{i}.mlp.down.bias": "transformer.h.{i}.mlp.c_proj.bias",
}
GPT2_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")  # stored (in, out)

NEOX_NAMES = {
    "wte.weight": "gpt_neox.embed_in.weight",
    "head.weight": "embed_out.weight",
    "ln_f.weight": "gpt_neox.final_layer_norm.weight",
    "ln_f.bias": "gpt_neox.final_layer_norm.bias",
    "blocks.{i}.ln_1.weight": "gpt_neox.layers.{i}.input_layernorm.weight",
    "blocks.{i}.ln_1.bias": "gpt_neox.layers.{i}.input_layernorm.bias",
    "blocks.{i}.ln_2.weight": "gpt_neox.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.ln_2.bias": "gpt_neox.layers.{i}.post_attention_layernorm.bias",
    "blocks.{i}.attn.qkv.weight": "gpt_neox.layers.{i}.attention.query_key_value.weight",
    "blocks.{i}.attn.qkv.bias": "gpt_neox.layers.{i}.attention.query_key_value.bias",
    "blocks.{i}.attn.proj.weight": "gpt_neox.layers.{i}.attention.dense.weight",
    "blocks.{i}.attn.proj.bias": "gpt_neox.layers.{i}.attention.dense.bias",
    "blocks.{i}.mlp.up.weight": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight",
    "blocks.{i}.mlp.up.bias": "gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias",
    "blocks.{i}.mlp.down.weight": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight",
    "blocks.{i}.mlp.down.bias": "gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias",
}

NAMES = {"gpt2": GPT2_NAMES, "neox": NEOX_NAMES}


def name_map(config: ModelConfig) -> dict[str, str]:
    """Every parameter name of ours -> its HF name, for this config's depth."""
    out = {}
    for ours, theirs in NAMES[config.family].items():
        if "{i}" in ours:
            out.update({ours.format(i=i): theirs.format(i=i) for i in range(config.n_layer)})
        else:
            out[ours] = theirs
    return out


def _bias_shape(name: str, config: ModelConfig) -> tuple[int, ...]:
    C = config.n_embd
    return {"qkv": (3 * C,), "up": (4 * C,)}.get(name.split(".")[-2], (C,))


def is_conv1d(config: ModelConfig, hf_name: str) -> bool:
    return config.family == "gpt2" and bool(GPT2_CONV1D.search(hf_name))


class HFView(TensorSource):
    """Our weights under HF names, tensor by tensor: GPT-2's Conv1D weights transposed, biases our
    config leaves out as zeros."""

    def __init__(self, ours: TensorSource, config: ModelConfig):
        self.ours, self.config = ours, config
        self.map = {theirs: name for name, theirs in name_map(config).items()}
        have = set(ours.names())
        for name in self.map.values():
            if name not in have and not (name.endswith(".bias") and not config.bias):
                raise KeyError(f"the state dict has no {name}: not a {config.family} model of this shape?")
        self.present = have

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> torch.Size:
        ours = self.map[name]
        if ours not in self.present:
            return torch.Size(_bias_shape(ours, self.config))
        shape = self.ours.shape(ours)
        return torch.Size(reversed(shape)) if is_conv1d(self.config, name) else shape

    def tensor(self, name: str) -> torch.Tensor:
        ours = self.map[name]
        if ours not in self.present:
            return torch.zeros(_bias_shape(ours, self.config))
        tensor = self.ours.tensor(ours)
        return tensor.t().contiguous() if is_conv1d(self.config, name) else tensor


class HFFolder(TensorSource):
    """An HF GPT-2/GPT-NeoX folder's weights under our names, tensor by tensor (safetensors files
    are mapped, so a tensor is read when asked for), in the dtype stored."""

    def __init__(self, path: str):
        with open(os.path.join(path, "config.json")) as f:
            self.config = config_from_hf(json.load(f))
        self.weights = Weights.of_hf_folder(path)
        self.map = {}
        for ours, theirs in name_map(self.config).items():
            if theirs in self.weights.where:
                self.map[ours] = theirs
            elif not (ours.endswith(".bias") and not self.config.bias):
                raise KeyError(f"the Hugging Face weights have no {theirs}")

    def names(self) -> list[str]:
        return list(self.map)

    def shape(self, name: str) -> torch.Size:
        shape = torch.Size(self.weights.meta(self.map[name])[0])
        return torch.Size(reversed(shape)) if is_conv1d(self.config, self.map[name]) else shape

    def tensor(self, name: str) -> torch.Tensor:
        tensor = self.weights.rows(self.map[name])
        return tensor.t().contiguous() if is_conv1d(self.config, self.map[name]) else tensor.contiguous()

    def close(self) -> None:
        self.weights.close()


# ---------------------------------------------------------------------------------------------
# configs


def hf_config(config: ModelConfig, eos_id: Optional[int] = None):
    """The transformers config; BOS/EOS are the tokenizer's end-of-text id (GPT-2's convention),
    or unset when the tokenizer is unknown (the library defaults point outside small vocabularies)."""
    import transformers

    special = {"bos_token_id": eos_id, "eos_token_id": eos_id}
    if config.family == "gpt2":
        return transformers.GPT2Config(**special,
            vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
            scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=True, architectures=["GPT2LMHeadModel"])
    return transformers.GPTNeoXConfig(**special,
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=4 * config.n_embd, hidden_act="gelu",
        max_position_embeddings=config.block_size, rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_base, use_parallel_residual=config.parallel_residual,
        layer_norm_eps=config.layer_norm_eps, tie_word_embeddings=False, attention_dropout=0.0,
        hidden_dropout=0.0, architectures=["GPTNeoXForCausalLM"])


def config_from_hf(data: dict[str, Any]) -> ModelConfig:
    """Our config from an HF config.json, refusing variants our models do not compute."""
    kind = data.get("model_type")
    if kind == "gpt2":
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 with activation {act!r}: only the tanh-approximated GELU is supported")
        if not data.get("scale_attn_weights", True):
            raise ValueError("GPT-2 with scale_attn_weights false: only attention scaled by 1/sqrt(head size) is supported")
        return GPTConfig(vocab_size=data["vocab_size"], block_size=data.get("n_positions", 1024),
                         n_layer=data["n_layer"], n_head=data["n_head"], n_embd=data["n_embd"], bias=True,
                         scale_attn_by_inverse_layer_idx=bool(data.get("scale_attn_by_inverse_layer_idx", False)))
    if kind == "gpt_neox":
        C = data["hidden_size"]
        if data.get("intermediate_size", 4 * C) != 4 * C:
            raise ValueError(f"GPT-NeoX with intermediate_size {data['intermediate_size']} != 4 × {C}")
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"GPT-NeoX with activation {data['hidden_act']!r}: only exact GELU is supported")
        if data.get("tie_word_embeddings"):
            raise ValueError("GPT-NeoX with tied embeddings is not supported")
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        return NeoXConfig(vocab_size=data["vocab_size"], block_size=data.get("max_position_embeddings", 2048),
                          n_layer=data["num_hidden_layers"], n_head=data["num_attention_heads"], n_embd=C,
                          rotary_pct=rope.get("partial_rotary_factor", data.get("rotary_pct", 0.25)),
                          rotary_base=rope.get("rope_theta", data.get("rotary_emb_base", 10000.0)),
                          parallel_residual=data.get("use_parallel_residual", True),
                          layer_norm_eps=data.get("layer_norm_eps", 1e-5))
    raise ValueError(f"model_type {kind!r}: only gpt2 and gpt_neox models can be imported")


# ---------------------------------------------------------------------------------------------
# folders


def export(weights: TensorSource | dict[str, torch.Tensor], config: ModelConfig, out_dir: str,
           tokenizer: Optional[str] = None, dtype: torch.dtype = torch.float32,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write an HF model folder (staged, then renamed: never half written), tensor by tensor into
    safetensors shards of at most `max_shard_bytes` with transformers' index (one model.safetensors
    when it fits in one); returns notes (e.g. why no usable tokenizer was written). `weights`: a state
    dict or any TensorSource (a ZeroFolder streams); `tokenizer`: a file or a folder holding one."""
    source = StateDictSource(weights) if isinstance(weights, dict) else weights
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    notes = []
    with staged(out_dir) as tmp:
        os.makedirs(tmp)
        write_safetensors(HFView(source, config), tmp, dtype, max_shard_bytes)
        hf_config(config, tok.eos_id if tok is not None else None).save_pretrained(tmp)
        if tok is None:
            notes.append("no tokenizer given: the folder holds the model only")
        else:
            # tokenizer.json with a config that makes AutoTokenizer load that very file: the ids of training.
            tok.save(tmp, max_length=config.block_size)
            if tok.kind == "sentencepiece":
                notes.append(f"the tokenizer is a sentencepiece model, which transformers cannot load as a GPT-2/NeoX "
                             f"tokenizer: it was copied as {tok.file_name} for reference only")
    return notes


def read_folder(path: str) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Weights and config of an HF model folder (safetensors or .bin, sharded or not), in our names."""
    source = HFFolder(path)
    return source.state_dict(), source.config


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def weight_source(folder: str, run_dir: Optional[str] = None,
                  need_config: bool = True) -> tuple[TensorSource, Optional[ModelConfig], Optional[str]]:
    """The weights, in our names and read tensor by tensor, of a Hugging Face folder or of a folder of
    ZeRO-3 files (a checkpoint, slot, ema/ or swa/ folder, an average), with the model config (from
    config.json, or the run's model.json found above the folder) and the run directory."""
    if is_hf_folder(folder):
        source = HFFolder(folder)
        return source, source.config, run_dir
    if run_dir is None:
        found = find_run_dir(folder)
        run_dir = found.path if found is not None else None
    has_config = run_dir is not None and os.path.isfile(RunDir(run_dir).model)
    if need_config and not has_config:
        raise ValueError(f"no {MODEL} found above {folder}: pass --run-dir RUN_DIR")
    return ZeroFolder(folder), read_model_config(RunDir(run_dir).model) if has_config else None, run_dir


def run_tokenizer(run_dir: str) -> Optional[str]:
    """The tokenizer the run trained with (the trainer keeps a copy in the run directory)."""
    path = RunDir(run_dir).tokenizer
    return path if os.path.isdir(path) else None


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="a checkpoint, slot or averaged-model folder -> a Hugging Face folder")
    ex.add_argument("folder", help="checkpoint tag folder, slot (or its ema/ swa/), or lawa_best/step_XXXXXXXX")
    ex.add_argument("--out", required=True)
    ex.add_argument("--run-dir", default=None, help="the run it came from (default: found above FOLDER)")
    ex.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    ex.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9,
                    help="largest safetensors file; bigger models get several and an index (default %(default)s)")
    pickles.add_trust_option(ex)
    im = sub.add_parser("import", help="a Hugging Face GPT-2/GPT-NeoX folder -> our state dict and config")
    im.add_argument("folder")
    im.add_argument("--out", required=True, help="a .pt file holding {'model': config, 'state_dict': ...}")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            with pickles.trusting(args.trust_pickle):
                source, config, run_dir = weight_source(args.folder, args.run_dir)
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
                notes = export(source, config, args.out, run_tokenizer(run_dir) if run_dir else None, dtype,
                               int(args.max_shard_gb * 1e9))
            for note in notes:
                print(f"note: {note}")
            print(f"wrote {args.out} ({config.family}, {config.n_layer} layers): "
                  f"transformers.AutoModelForCausalLM.from_pretrained({args.out!r}) loads it")
        else:
            state_dict, config = read_folder(args.folder)
            torch.save({"model": config_to_dict(config), "state_dict": state_dict}, args.out)
            print(f"wrote {args.out}: {config.family}, {len(state_dict)} tensors")
    except (ValueError, KeyError, FileNotFoundError) as e:  # WeightsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
