"""Model weights read lazily, tensor by tensor (or row block by row block), from safetensors
files, torch state-dict pickles and Hugging Face model folders (single or sharded with an index),
so that tools holding several big models hold a block of each at a time, not the whole; and
safetensors written the same way, tensor by tensor, sharded as transformers shards big models."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch

from core import pickles
from core.log import logger

HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_KEYS = ("model", "state_dict", "module")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class WeightsError(ValueError):
    """A weights file or folder that cannot be read as asked; the message names the file."""


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and any(torch.is_tensor(v) for v in obj.values()) and \
        not any(isinstance(v, dict) for v in obj.values())


def state_dict_in(obj: Any, path: str) -> tuple[Optional[str], dict]:
    """(key it sits under, or None when obj is the state dict itself; the state dict)."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if is_state_dict(obj.get(key)):
                return key, obj[key]
    if is_state_dict(obj):
        return None, obj
    raise WeightsError(f"{path}: no state dict in it (neither tensors by name nor under {'/'.join(STATE_DICT_KEYS)})")


class Weights:
    """One model's tensors by name, read lazily from its files (safetensors or torch pickles)."""

    def __init__(self, where: dict[str, str]):
        self.where = where  # tensor name -> file
        self.open: dict[str, Any] = {}

    @classmethod
    def of_files(cls, files: list[str]) -> Weights:
        weights = cls({})
        for file in files:
            weights.where.update((key, file) for key in weights.names_in(file))
        return weights

    @classmethod
    def of_hf_folder(cls, path: str) -> Weights:
        return cls(hf_weight_files(path)[1])

    def handle(self, file: str) -> Any:
        """A safetensors file opened lazily (header read, data mapped), or a torch state dict
        loaded with mmap: either way, tensors are read only when asked for."""
        if file not in self.open:
            if file.endswith(".safetensors"):
                from safetensors import safe_open
                try:
                    self.open[file] = safe_open(file, framework="pt")
                except Exception as e:
                    raise WeightsError(f"cannot read {file}: {e}") from None
            else:
                self.open[file] = state_dict_in(pickles.load(file), file)[1]
        return self.open[file]

    def close(self) -> None:
        self.open.clear()  # shard by shard: drop the maps of files we are done with

    def names_in(self, file: str) -> list[str]:
        """The tensors in file, in file order where known."""
        handle = self.handle(file)
        if isinstance(handle, dict):
            return [k for k, v in handle.items() if torch.is_tensor(v)]
        return list(getattr(handle, "offset_keys", handle.keys)())

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        handle = self.handle(self.where[key])
        if isinstance(handle, dict):
            if not torch.is_tensor(handle.get(key)):
                raise WeightsError(f"{self.where[key]} has no tensor {key}, although its index names it")
            return tuple(handle[key].shape), handle[key].dtype
        try:
            piece = handle.get_slice(key)
        except Exception:
            raise WeightsError(f"{self.where[key]} has no tensor {key}, although its index names it") from None
        name = piece.get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{self.where[key]}: tensor {key} has dtype {name}, which this tool does not handle")
        return tuple(piece.get_shape()), SAFETENSORS_DTYPES[name]

    def rows(self, key: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows start:stop of tensor key (all of it when it is a scalar), read from disk now."""
        handle = self.handle(self.where[key])
        if isinstance(handle, dict):
            tensor = handle[key]
            return tensor if tensor.dim() == 0 else tensor[start:stop]
        piece = handle.get_slice(key)
        return handle.get_tensor(key) if not piece.get_shape() else piece[start:stop]


def hf_weight_files(path: str) -> tuple[Optional[str], dict[str, str]]:
    """(index file name or None, tensor name -> weight file path) of a Hugging Face model folder."""
    for index in HF_INDEXES:
        if os.path.isfile(os.path.join(path, index)):
            try:
                with open(os.path.join(path, index)) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise WeightsError(f"{path}/{index}: not a weight index ({e})") from None
            return index, {k: os.path.join(path, v) for k, v in weight_map.items()}
    for single in HF_SINGLE:
        if os.path.isfile(os.path.join(path, single)):
            return None, Weights.of_files([os.path.join(path, single)]).where
    raise WeightsError(f"{path}: no model.safetensors, pytorch_model.bin or weight index in it")


# ---------------------------------------------------------------------------------------------
# writing, tensor by tensor

MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size
SAFETENSORS_INDEX = HF_INDEXES[0]


def _header(entries: list[tuple[str, torch.Size]], dtype: torch.dtype) -> bytes:
    """A safetensors header: tensors laid out back to back in the order given, padded with spaces
    to 8 bytes as the format asks."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, size = 0, torch.empty((), dtype=dtype).element_size()
    for name, shape in entries:
        nbytes = size * math.prod(shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    return data + b" " * (-len(data) % 8)


def write_safetensors(source, folder: str, dtype: torch.dtype = torch.float32,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write every tensor of a TensorSource (core.zero_folder) into `folder` as safetensors, one tensor
    in memory at a time: model.safetensors, or model-0000i-of-0000n.safetensors shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) with transformers' index file.
    Returns the files written."""
    size = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    used = 0
    for name in source.names():
        shape = torch.Size(source.shape(name))
        nbytes = size * math.prod(shape)
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, (file, entries) in enumerate(zip(files, shards)):
        header = _header(entries, dtype)
        with open(os.path.join(folder, file), "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for name, shape in entries:
                tensor = source.tensor(name).to(dtype).contiguous()
                if tensor.shape != shape:
                    raise WeightsError(f"{name}: the source said {tuple(shape)}, then gave {tuple(tensor.shape)}")
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor
        if n > 1:
            logger.info(f"wrote {file} ({i + 1} of {n}: {len(entries)} tensors)")
    if n > 1:
        total = size * sum(math.prod(shape) for entries in shards for _, shape in entries)
        weight_map = {name: file for file, entries in zip(files, shards) for name, _ in entries}
        with open(os.path.join(folder, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return files
