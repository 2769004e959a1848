"""Offline merges: the sidecar's merges (lawa.merges) of saved checkpoints, written in the layout of
their inputs. Uniform over the latest k is LAWA; linear, cosine and 1-sqrt weight them like that
decay (averaging/lawa.py: the merge that emulates such a cooldown).

    python -m averaging.offline --out OUT INPUT [INPUT ...] [--weights uniform|linear|cosine|1-sqrt]
    python -m averaging.offline --out OUT --from-dir DIR [--k 5 | --window-tokens N] [--spacing N] [--weights W]

The inputs are all of one kind, and OUT is of the same kind:

  slot        one of our snapshot folders (manifest.json + COMMITTED): OUT is a committed slot of
              kind "offline", averaged one (dp, tp) rank at a time; model states from the newest.
  deepspeed   a DeepSpeed checkpoint tag folder (*_model_states.pt, *_optim_states.pt; ZeRO 0-3):
              OUT is a tag folder with the fp32 master partitions and the floating-point `module`
              tensors averaged, file by file, that zero_to_fp32 consolidates. WEIGHTS ONLY: the
              optimizer moments (exp_avg, exp_avg_sq) are dropped, so resume from it with
              load_optimizer_states=False. A `latest` file is written next to OUT if none exists.
  hf          a Hugging Face model folder (model.safetensors, pytorch_model.bin, or sharded with an
              *.index.json): OUT has the newest input's file names, sharding and index, and its
              config/tokenizer files (not its optimizer/scheduler/RNG state).
  safetensors a .safetensors file;  torch  a .pt/.bin/.pth state dict (or a dict holding one under
              model/state_dict/module; other entries are kept from the newest, optimizer ones dropped).

"Newest" is the input with the highest step (slot manifest; else a step_N, global_stepN or
checkpoint-N name); when some input has no step, the last one on the command line. Averages are
taken in fp32 and cast back to each tensor's dtype; non-floating tensors come from the newest.
--from-dir picks from DIR's step-named subfolders (committed ones only for slots, complete ones
only for the launcher's checkpoints) the newest k spaced at least --spacing steps apart, or with
--window-tokens every one (so spaced) within N tokens of the newest, as a merge's window_tokens
does: tokens come from our slots' and checkpoints' own records, else from --tokens-per-step. A
weighting other than uniform needs each input's step (a slot's manifest, or a step in its name).
Every torch file is unpickled weights-only (tensors and DeepSpeed's plain types; anything else is
refused, naming the file) unless --trust-pickle says you trust the inputs; files of our own slots
and checkpoints are verified against their folder's checksums first. OUT is written into a hidden sibling and renamed at the end: a crash leaves no OUT.
"""
from __future__ import annotations

import argparse
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

from averaging import lawa, slots
from core import pickles
from core.files import OutputExists, any_step_of, staged, write_file_atomic
from core.flat_layout import FlatLayout, LayoutMismatch, zero_padding
from core.log import logger, setup_logging
from core.run_dir import LATEST, MANIFEST, RUN_STATE
from core.weights import (
    DTYPE_NAMES,
    HF_INDEXES,
    HF_SINGLE,
    Weights,
    hf_weight_files,
    state_dict_in,
)
from core.zero_checkpoint import RunState, flat_groups_key, load_recorded, recorded_files

# Tensors are averaged in row blocks of at most this many elements: with k inputs, about k + 2
# such blocks are in memory at a time, whatever the size of the model.
BLOCK_ELEMENTS = 1 << 24


class UsageError(Exception):
    """A mistake in what we were asked to do: reported as one line, exit code 2."""


def mismatch(a: str, b: str, what: str) -> UsageError:
    return UsageError(f"cannot average {a} with {b}: {what}")


# ---------------------------------------------------------------------------------------------
# recognising inputs

TORCH_EXTS = (".pt", ".bin", ".pth")
# Training state an HF Trainer leaves next to the weights: stale for an average, and large.
HF_TRAINING_STATE = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")


def kind_of(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors"
        if path.endswith(TORCH_EXTS):
            return "torch"
        raise UsageError(f"{path}: not a .safetensors/.pt/.bin/.pth file")
    names = set(os.listdir(path))
    # A slot also holds *_model_states.pt: its manifest is what tells it apart.
    if MANIFEST in names or slots.is_committed(path):
        return "slot"
    if any(n.endswith("model_states.pt") for n in names):
        return "deepspeed"
    if names & set(HF_INDEXES + HF_SINGLE):
        return "hf"
    raise UsageError(f"{path}: neither a slot, a DeepSpeed tag folder nor a Hugging Face model folder")


def tokens_of(path: str) -> Optional[int]:
    """The tokens trained when a folder of ours was written (a slot's manifest, a checkpoint's run state)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return slots.read_manifest(path).tokens
    if os.path.isfile(os.path.join(path, RUN_STATE)):
        return RunState.read(path).tokens
    return None


def pick_from_dir(root: str, k: Optional[int], spacing: int, window_tokens: Optional[int] = None,
                  tokens_per_step: Optional[int] = None) -> list[str]:
    """The step-named subfolders of root a merge takes: the newest k spaced apart, or every one so
    spaced within window_tokens of the newest; oldest first."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: no such directory")
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root)):
        path, step = os.path.join(root, name), any_step_of(name)
        if step is None or not os.path.isdir(path):
            continue
        if step in found:
            raise UsageError(f"{root}: both {os.path.basename(found[step])} and {name} are step {step}")
        found[step] = path
    # Torn folders look like checkpoints: only committed slots / complete launcher checkpoints count.
    if any(slots.is_committed(p) or os.path.exists(os.path.join(p, MANIFEST)) for p in found.values()):
        usable, what = slots.is_committed, "committed slots"
    elif any(os.path.isfile(os.path.join(p, RUN_STATE)) for p in found.values()):
        usable, what = (lambda p: os.path.isfile(os.path.join(p, RUN_STATE))), "complete checkpoints"
    else:
        usable, what = (lambda p: True), ""
    skipped = sorted(s for s, p in found.items() if not usable(p))
    if skipped:
        logger.info(f"skipping steps {skipped}: not {what}")
    found = {s: p for s, p in found.items() if usable(p)}
    chosen = lawa.select_spaced(found, k if k is not None else len(found), spacing)
    if not chosen:
        raise UsageError(f"{root}: no step_N, global_stepN or checkpoint-N checkpoints in it")
    if window_tokens is not None:
        tokens = {s: tokens_of(found[s]) for s in chosen}
        if any(t is None for t in tokens.values()):
            if tokens_per_step is None:
                unknown = next(found[s] for s, t in tokens.items() if t is None)
                raise UsageError(f"--window-tokens: {unknown} does not record its tokens; give --tokens-per-step")
            tokens = {s: s * tokens_per_step for s in chosen}
        chosen = [s for s in chosen if tokens[chosen[0]] - tokens[s] <= window_tokens]
        logger.info(f"chose steps {chosen} from {root}: every one within {window_tokens:,} tokens of the newest"
                    f"{f' at spacing {spacing}' if spacing else ''}")
    else:
        note = f" (only {len(chosen)} of {k} available at spacing {spacing})" if len(chosen) < k else ""
        logger.info(f"chose steps {chosen} from {root}{note}")
    return [found[s] for s in sorted(chosen)]


def input_weights(inputs: list[str], weighting: str) -> Optional[dict[str, float]]:
    """Each input's weight in the merge (oldest first by step, as the sidecar weights snapshots);
    None for uniform (the plain mean: a sum and one division, as the sidecar's LAWA)."""
    if weighting == "uniform":
        return None
    steps = {p: slots.read_manifest(p).step if os.path.isfile(os.path.join(p, MANIFEST)) else
             any_step_of(os.path.splitext(p)[0]) for p in inputs}
    unknown = [p for p, s in steps.items() if s is None]
    if unknown:
        raise UsageError(f"--weights {weighting}: cannot tell the step of {unknown[0]} (a step_N, global_stepN or "
                         f"checkpoint-N name, or a slot); only uniform needs none")
    if len(set(steps.values())) < len(steps):
        raise UsageError(f"--weights {weighting}: two inputs are of the same step")
    order = sorted(inputs, key=steps.get)
    return dict(zip(order, lawa.merge_weights([steps[p] for p in order], weighting)))


def oldest_first(paths: list[str], steps: list[Optional[int]]) -> list[str]:
    if any(s is None for s in steps):
        return list(paths)  # no order to go by but the command line's
    return [p for _, p in sorted(zip(steps, paths), key=lambda sp: sp[0])]


# ---------------------------------------------------------------------------------------------
# writing OUT all at once


def average_like(tensors: list[torch.Tensor], like: torch.Tensor, weights: Optional[list[float]]) -> torch.Tensor:
    """Floating tensors: the fp32 weighted sum in like's dtype. Others (counters, masks): like itself."""
    if not like.is_floating_point():
        return like
    return lawa.average_tensors(tensors, weights).to(like.dtype)


# ---------------------------------------------------------------------------------------------
# 1. our slots


def in_order(weight: Optional[dict[str, float]], inputs: list[str]) -> Optional[list[float]]:
    return None if weight is None else [weight[p] for p in inputs]


def average_slots(inputs: list[str], tmp: str, weight: Optional[dict[str, float]]) -> str:
    manifests = [slots.read_manifest(p) for p in inputs]
    for path, manifest in zip(inputs[1:], manifests[1:]):
        try:
            slots.check_compatible([manifests[0], manifest])
        except LayoutMismatch as e:
            raise UsageError(f"{e} ({inputs[0]} vs {path})") from None
    order = sorted(range(len(inputs)), key=lambda i: manifests[i].step)
    inputs, manifests = [inputs[i] for i in order], [manifests[i] for i in order]
    newest, first = manifests[-1], manifests[0]
    layout = first.layout()
    dp, tp = first.dp, first.tp
    files: dict[str, dict] = {}
    # One rank at a time: k copies of one rank's partition are all that is ever in memory.
    for tp_rank in range(tp):
        for dp_rank in range(dp):
            shards = [slots.read_shard(p, dp_rank, tp_rank, m)[0] for p, m in zip(inputs, manifests)]
            averaged = lawa.average_shards(shards, in_order(weight, inputs))
            # The padding is garbage in raw DeepSpeed partitions; averaging keeps each element
            # apart, so zeroing the result is the same as zeroing every input first.
            zero_padding(averaged, layout, dp_rank)
            model_states = slots.read_model_states(inputs[-1], dp_rank, tp_rank, newest)
            files.update(slots.write_shard(tmp, dp_rank, tp_rank, averaged, model_states, layout=layout))
            logger.info(f"[{tp_rank * dp + dp_rank + 1}/{dp * tp}] rank dp {dp_rank} tp {tp_rank}: "
                f"{len(averaged)} flat groups, {sum(t.numel() for t in averaged):,} elements")
            del shards, averaged
    steps = [m.step for m in reversed(manifests)]  # newest first, like the sidecar's
    slots.commit(tmp, slots.SlotManifest(
        kind="offline", step=newest.step, tokens=newest.tokens, lr=newest.lr, dp=dp, tp=tp,
        param_shapes=first.param_shapes, files=files, tensor_parallel_layout=newest.tensor_parallel_layout,
        **layout.to_json(), ds_version=newest.ds_version, steps_averaged=steps,
        merge_weights=[] if weight is None else [weight[p] for p in reversed(inputs)]))
    return f"committed slot of step {newest.step}, average of steps {steps}"


# ---------------------------------------------------------------------------------------------
# 2. DeepSpeed checkpoint tag folders

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def ds_files(path: str) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(path))
    return ([n for n in names if n.endswith("model_states.pt")], [n for n in names if n.endswith("optim_states.pt")])


def ds_stage(path: str, optim_names: list[str]) -> int:
    if not optim_names:
        return 0  # ZeRO off: the optimizer lives in the model-states file
    inner = load_recorded(os.path.join(path, optim_names[0]), recorded_files(path))["optimizer_state_dict"]
    return int(inner["zero_stage"])


def average_module(states: list[dict], inputs: list[str], name: str, weights: Optional[list[float]]) -> dict:
    newest = states[-1]["module"]
    for other, path in zip(states[:-1], inputs[:-1]):
        module = other["module"]
        for key in newest.keys() | module.keys():
            if key not in module or key not in newest:
                has, lacks = (inputs[-1], path) if key in newest else (path, inputs[-1])
                raise mismatch(path, inputs[-1], f"{name}: {has} has {key}, {lacks} does not")
            a, b = module[key], newest[key]
            if torch.is_tensor(a) and torch.is_tensor(b) and a.shape != b.shape:
                raise mismatch(path, inputs[-1], f"{name}: {key} has shape {tuple(a.shape)} vs {tuple(b.shape)}")
    return OrderedDict((key, average_like([s["module"][key] for s in states], t, weights) if torch.is_tensor(t) else t)
                       for key, t in newest.items())


def check_param_shapes(states: list[dict], inputs: list[str], name: str) -> None:
    reference = states[-1].get("param_shapes")
    for other, path in zip(states[:-1], inputs[:-1]):
        shapes = other.get("param_shapes")
        if shapes == reference:
            continue
        a = {n: tuple(s) for g in shapes or [] for n, s in g.items()}
        b = {n: tuple(s) for g in reference or [] for n, s in g.items()}
        diff = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
        detail = f"{diff[0]}: {a.get(diff[0])} vs {b.get(diff[0])}" if diff else "parameter order differs"
        raise mismatch(path, inputs[-1], f"{name}: parameter shapes differ ({detail})")


def zero_stage3_padding(groups: list[torch.Tensor], param_shapes: list[dict], dp_rank: int, dp: int,
                        where: str) -> list[torch.Tensor]:
    try:
        zero_padding(groups, FlatLayout.zero3(param_shapes, dp), dp_rank)
    except LayoutMismatch as e:
        raise UsageError(f"{where}: {e}") from None
    return groups


def average_ds_optim(inputs: list[str], name: str, param_shapes: Optional[list[dict]],
                     records: dict[str, Optional[dict]], weights: Optional[list[float]]) -> dict:
    states = [load_recorded(os.path.join(p, name), records[p]) for p in inputs]
    inners = [s["optimizer_state_dict"] for s in states]
    stage = int(inners[-1]["zero_stage"])
    key = flat_groups_key(stage)
    for inner, path in zip(inners[:-1], inputs[:-1]):
        for field in ("zero_stage", "partition_count"):
            if inner.get(field) != inners[-1].get(field):
                raise mismatch(path, inputs[-1], f"{name}: {field} {inner.get(field)} vs {inners[-1].get(field)}")
        sizes, newest_sizes = [t.numel() for t in inner[key]], [t.numel() for t in inners[-1][key]]
        if sizes != newest_sizes:
            raise mismatch(path, inputs[-1], f"{name}: fp32 partitions of {sizes} vs {newest_sizes} elements")
    averaged = lawa.average_shards([inner[key] for inner in inners], weights)
    if stage == 3:
        dp_rank = int(OPTIM_FILE.match(name).group(1))
        averaged = zero_stage3_padding(averaged, param_shapes, dp_rank, int(inners[-1]["partition_count"]),
                                       f"{inputs[-1]}/{name}")
    # ZeRO 1/2 pad with zeros they allocate themselves: nothing to clean there.
    out = {**states[-1], "optimizer_state_dict": {**inners[-1], key: averaged}}
    # Weights only: moments of k different points have no meaning at their average.
    out["optimizer_state_dict"].pop("optimizer_state_dict", None)  # ZeRO-3
    out["optimizer_state_dict"].pop("base_optimizer_state", None)  # ZeRO-1/2
    return out


def average_deepspeed(inputs: list[str], tmp: str, weight: Optional[dict[str, float]]) -> str:
    inputs = oldest_first(inputs, [any_step_of(p) for p in inputs])
    weights = in_order(weight, inputs)
    model_names, optim_names = ds_files(inputs[-1])
    for path in inputs[:-1]:
        if ds_files(path) != (model_names, optim_names):
            a, b = set(sum(ds_files(path), [])), set(model_names + optim_names)
            raise mismatch(path, inputs[-1], f"different checkpoint files (only in the first: "
                                             f"{sorted(a - b)[:3]}, only in the second: {sorted(b - a)[:3]})")
    stages = [ds_stage(p, optim_names) for p in inputs]
    for path, stage in zip(inputs[:-1], stages[:-1]):
        if stage != stages[-1]:
            raise mismatch(path, inputs[-1], f"ZeRO stage {stage} vs {stages[-1]}")
    records = {p: recorded_files(p) for p in inputs}  # our checkpoints' files are verified against them
    os.makedirs(tmp)
    total, done = len(model_names) + len(optim_names), 0
    rank_shapes: dict[tuple[int, int], list[dict]] = {}
    for name in model_names:
        states = [load_recorded(os.path.join(p, name), records[p]) for p in inputs]
        check_param_shapes(states, inputs, name)
        out = {**states[-1], "module": average_module(states, inputs, name, weights)}
        if out.get("optimizer") is not None:
            out["optimizer"] = None  # ZeRO off: the torch optimizer state sits here; weights only
        match = re.match(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$", name)
        if match:
            rank_shapes[(int(match.group(1)), int(match.group(2)))] = out.get("param_shapes")
        torch.save(out, os.path.join(tmp, name))
        done += 1
        logger.info(f"[{done}/{total}] {name}: {len(out['module'])} module tensors")
        del states, out
    for name in optim_names:
        match = OPTIM_FILE.match(name)
        shapes = rank_shapes.get((int(match.group(1)), int(match.group(2)))) if match else None
        if stages[-1] == 3 and shapes is None:
            raise UsageError(f"{inputs[-1]}: no model-states file with param_shapes for {name}")
        out = average_ds_optim(inputs, name, shapes, records, weights)
        torch.save(out, os.path.join(tmp, name))
        done += 1
        key = flat_groups_key(stages[-1])
        logger.info(f"[{done}/{total}] {name}: {sum(t.numel() for t in out['optimizer_state_dict'][key]):,} fp32 elements")
        del out
    for name in sorted(os.listdir(inputs[-1])):
        src = os.path.join(inputs[-1], name)
        if name not in model_names + optim_names and name != RUN_STATE and os.path.isfile(src):
            shutil.copy2(src, os.path.join(tmp, name))
    return (f"ZeRO-{stages[-1]} tag folder, average of {[os.path.basename(p) for p in inputs]}; "
            f"weights only (optimizer moments dropped: load with load_optimizer_states=False)")


# ---------------------------------------------------------------------------------------------
# 3. state dicts and Hugging Face folders, streamed tensor by tensor

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
    step = max(1, BLOCK_ELEMENTS // max(per_row, 1))
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


# ---------------------------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other refusal
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = Parser(prog="python -m averaging.offline", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="checkpoints to average (all of one kind)")
    parser.add_argument("--out", required=True, help="where to write the average (must not exist)")
    parser.add_argument("--from-dir", metavar="DIR", help="pick the inputs from DIR's step-named subfolders")
    parser.add_argument("--k", type=int, default=None,
                        help=f"with --from-dir: how many, the latest (default {lawa.LawaArgs.k} unless --window-tokens)")
    parser.add_argument("--window-tokens", type=int, default=None,
                        help="with --from-dir: every checkpoint within this many tokens of the newest, instead of --k")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="with --window-tokens: for folders that do not record their tokens")
    parser.add_argument("--spacing", type=int, default=0,
                        help="with --from-dir: minimum steps between picked checkpoints (0: consecutive)")
    parser.add_argument("--weights", default="uniform", choices=("uniform", *lawa.DECAYS),
                        help="uniform (LAWA), or weighted like that decay, as lawa.merges' weights (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    pickles.add_trust_option(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    if args.from_dir is not None and args.inputs:
        raise UsageError("give either INPUT paths or --from-dir, not both")
    if args.k is not None and args.window_tokens is not None:
        raise UsageError("give --k or --window-tokens, not both (as a merge takes k or window_tokens)")
    if args.from_dir is None and (args.k is not None or args.window_tokens is not None):
        raise UsageError("--k and --window-tokens pick from --from-dir; with INPUT paths every one is merged")
    if args.from_dir is not None:
        k = args.k if args.k is not None or args.window_tokens is not None else lawa.LawaArgs.k
        for flag, value, least in (("--k", k, 1), ("--spacing", args.spacing, 0),
                                   ("--window-tokens", args.window_tokens, 1), ("--tokens-per-step", args.tokens_per_step, 1)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be at least {least}, got {value}")
        inputs = pick_from_dir(args.from_dir, k, args.spacing, args.window_tokens, args.tokens_per_step)
    else:
        inputs = list(args.inputs)
    if not inputs:
        raise UsageError("nothing to average: give at least one INPUT or --from-dir")
    inputs = [os.path.normpath(p) for p in inputs]
    kinds = {p: kind_of(p) for p in inputs}
    if len(set(kinds.values())) > 1:
        a = inputs[0]
        b = next(p for p in inputs if kinds[p] != kinds[a])
        raise UsageError(f"inputs of different kinds: {a} is a {kinds[a]}, {b} is a {kinds[b]}")
    if len(set(map(os.path.realpath, inputs))) < len(inputs):
        raise UsageError("an input is given twice: it would weigh double in the average")
    out = os.path.normpath(args.out)
    if os.path.realpath(out) in map(os.path.realpath, inputs):
        raise UsageError(f"--out {out} is one of the inputs")
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"{out} already exists (--force replaces it)")
    kind = kinds[inputs[0]]
    if (kind == "safetensors" and not out.endswith(".safetensors")) or \
            (kind == "torch" and not out.endswith(TORCH_EXTS)):
        raise UsageError(f"--out {out}: the inputs are {kind} files, so OUT must be one too (same extension)")
    weight = input_weights(inputs, args.weights)
    shown = "" if weight is None else " (" + ", ".join(f"{weight[p]:.3f}" for p in weight) + ", oldest first)"
    logger.info(f"merging {len(inputs)} {kind} checkpoint(s) into {out}, weights {args.weights}{shown}")
    average = {"slot": average_slots, "deepspeed": average_deepspeed, "hf": average_hf,
               "safetensors": average_files, "torch": average_files}[kind]
    try:
        with staged(out, replace=args.force) as tmp:
            what = average(inputs, tmp, weight)
    except OutputExists:  # appeared while we worked
        raise UsageError(f"{out} already exists (--force replaces it)") from None
    if kind == "deepspeed":
        latest = os.path.join(os.path.dirname(os.path.abspath(out)), LATEST)
        if not os.path.exists(latest):  # what zero_to_fp32 reads when given no tag
            write_file_atomic(latest, os.path.basename(os.path.abspath(out)))
    return f"wrote {out}: {what}"


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        with pickles.trusting(args.trust_pickle):
            logger.info(run(args))
    except (UsageError, ValueError, slots.SlotError) as e:  # WeightsError, PickleError, ChecksumMismatch: ValueErrors
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # disk full, permissions: not a bug here, and OUT was left untouched
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
