"""Offline merges of Hugging Face folders (single or sharded) and state-dict files, streamed tensor by
tensor, block by block: the output file is written as the inputs are read."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm import tqdm

from averaging import lawa
from averaging.offline import common
from averaging.offline.common import in_order, mismatch, oldest_first
from core import pickles
from core.files import any_step_of
from core.log import logger
from core.weights import DTYPE_NAMES, HF_INDEXES, Weights, hf_weight_files, state_dict_in

# Training state an HF Trainer leaves next to the weights: stale for an average, and large.
HF_TRAINING_STATE = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def check_same_tensors(weights: list[Weights], inputs: list[str], keys: list[str]) -> None:
    """Before writing anything: every input has exactly these tensors, in the same shapes."""
    for w, path in zip(weights[:-1], inputs[:-1]):
        missing, extra = sorted(set(keys) - set(w.where)), sorted(set(w.where) - set(keys))
        if missing or extra:
            key, has, lacks = (missing[0], inputs[-1], path) if missing else (extra[0], path, inputs[-1])
            raise mismatch(path, inputs[-1], f"tensor {key} is in {has} but not in {lacks}")
        for key in keys:
            a, b = w.meta(key)[0], weights[-1].meta(key)[0]
            if a != b:
                raise mismatch(path, inputs[-1], f"tensor {key} has shape {a} vs {b}")
    for w in weights:
        w.close()


def averaged_blocks(weights: list[Weights], key: str, merge: Optional[list[float]]) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, merged block in the newest input's dtype) covering tensor `key`; `merge`: each
    input's weight."""
    shape, dtype = weights[-1].meta(key)
    rows = shape[0] if shape else 1
    per_row = math.prod(shape[1:]) if shape else 1
    step = max(1, common.BLOCK_ELEMENTS // max(per_row, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        newest = weights[-1].rows(key, start, stop)
        if not dtype.is_floating_point:
            yield start, newest.clone()
        else:
            blocks = [w.rows(key, start, stop) for w in weights[:-1]] + [newest]
            yield start, lawa.average_tensors(blocks, merge).to(dtype)


def write_safetensors(path: str, weights: list[Weights], keys: list[str], metadata: Optional[dict],
                      progress: Callable[[Iterator], Iterator], merge: Optional[list[float]]) -> None:
    """The safetensors format written block by block: shapes and dtypes are known from the inputs'
    headers, so the header goes first and no tensor is ever held whole."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in keys:
        shape, dtype = weights[-1].meta(key)
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for key in progress(keys):
            for _, block in averaged_blocks(weights, key, merge):
                f.write(block.contiguous().reshape(-1).view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())


def averaged_state_dict(weights: list[Weights], keys: list[str], like: dict,
                        progress: Callable[[Iterator], Iterator], merge: Optional[list[float]]) -> dict:
    """A pickled file can only be written whole: this holds one output file, inputs stay mapped."""
    out = type(like)() if isinstance(like, OrderedDict) else {}
    if hasattr(like, "_metadata"):
        out._metadata = like._metadata  # module versions, used by load_state_dict
    todo = set(keys)
    for key in progress(list(like)):
        if key not in todo:
            out[key] = like[key]  # a non-tensor entry
            continue
        shape, dtype = weights[-1].meta(key)
        tensor = torch.empty(shape, dtype=dtype)
        for start, block in averaged_blocks(weights, key, merge):
            if tensor.dim() == 0:
                tensor.copy_(block)
            else:
                tensor[start:start + len(block)] = block
        out[key] = tensor
    return out


def average_weight_file(weights: list[Weights], file: str, out_path: str, merge: Optional[list[float]],
                        container: Any = None) -> int:
    """Writes the tensors that the newest input keeps in `file` to out_path; returns their number."""
    keys = [k for k in weights[-1].names_in(file) if weights[-1].where.get(k) == file]

    def progress(items):
        return tqdm(items, desc=os.path.basename(out_path), unit="tensor", leave=False, disable=None, file=sys.stderr)

    if file.endswith(".safetensors"):
        write_safetensors(out_path, weights, keys, weights[-1].handle(file).metadata(), progress, merge)
    else:
        sd = averaged_state_dict(weights, keys, weights[-1].handle(file), progress, merge)
        torch.save(wrap(container, sd) if container is not None else sd, out_path)
    for w in weights:
        w.close()
    return len(keys)


def wrap(container: tuple[Optional[str], Any], sd: dict) -> Any:
    """The newest file's outer dict around the averaged state dict, without optimizer entries."""
    key, outer = container
    if key is None:
        return sd
    return {**{k: v for k, v in outer.items() if "optim" not in k.lower()}, key: sd}


def average_files(inputs: list[str], out_tmp: str, weight: Optional[dict[str, float]]) -> str:
    inputs = oldest_first(inputs, [any_step_of(os.path.splitext(p)[0]) for p in inputs])
    weights = [Weights.of_files([p]) for p in inputs]
    check_same_tensors(weights, inputs, list(weights[-1].where))
    container, dropped = None, []
    if not inputs[-1].endswith(".safetensors"):
        outer = pickles.load(inputs[-1])
        key = state_dict_in(outer, inputs[-1])[0]
        container = (key, outer)
        dropped = [k for k in outer if "optim" in k.lower()] if key is not None else []
    n = average_weight_file(weights, inputs[-1], out_tmp, in_order(weight, inputs), container)
    logger.info(f"[1/1] {os.path.basename(inputs[-1])}: {n} tensors")
    return f"{n} tensors averaged" + (f"; dropped {dropped} of the newest (weights only)" if dropped else "")


def average_hf(inputs: list[str], tmp: str, weight: Optional[dict[str, float]]) -> str:
    inputs = oldest_first(inputs, [any_step_of(p) for p in inputs])
    maps = [hf_weight_files(p) for p in inputs]
    weights = [Weights(where) for _, where in maps]
    keys = list(weights[-1].where)
    check_same_tensors(weights, inputs, keys)
    index, where = maps[-1]
    files = list(dict.fromkeys(where.values()))  # the newest's files, in index order
    os.makedirs(tmp)
    total = 0
    for i, file in enumerate(files, 1):
        n = average_weight_file(weights, file, os.path.join(tmp, os.path.basename(file)), in_order(weight, inputs))
        total += n
        logger.info(f"[{i}/{len(files)}] {os.path.basename(file)}: {n} tensors")
    # Everything else that describes the model comes from the newest: config, tokenizer, index.
    written = {os.path.basename(f) for f in files}
    copied, skipped = [], []
    for name in sorted(os.listdir(inputs[-1])):
        src = os.path.join(inputs[-1], name)
        if name in written or not os.path.isfile(src):
            continue
        stale_weights = name.endswith(".safetensors") or re.match(r"^pytorch_model.*\.bin$", name) or \
            (name in HF_INDEXES and name != index)
        if stale_weights or HF_TRAINING_STATE.match(name):
            skipped.append(name)  # weights in a format we did not average, or training state
            continue
        shutil.copy2(src, os.path.join(tmp, name))
        copied.append(name)
    note = f"; not copied: {skipped}" if skipped else ""
    return (f"{len(files)} weight file(s), {total} tensors averaged over {len(inputs)} inputs; "
            f"copied {copied} from the newest{note}")


