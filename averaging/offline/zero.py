"""Offline merges of our slots (one rank's partition at a time) and of DeepSpeed tag folders of any
ZeRO stage (file by file, weights only), each written in the layout of its inputs."""
from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from typing import Optional

import torch

from averaging import lawa, slots
from averaging.offline.common import UsageError, average_like, in_order, mismatch, oldest_first
from core.files import any_step_of
from core.flat_layout import FlatLayout, LayoutMismatch, zero_padding
from core.log import logger
from core.run_dir import RUN_STATE
from core.zero_checkpoint import (
    flat_groups_key,
    load_recorded,
    ranks_of_file,
    recorded_files,
    zero_files,
    zero_stage_of,
)


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
        dp_rank = ranks_of_file(name)[0]
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
    model_names, optim_names = zero_files(inputs[-1])
    for path in inputs[:-1]:
        if zero_files(path) != (model_names, optim_names):
            a, b = set(sum(zero_files(path), [])), set(model_names + optim_names)
            raise mismatch(path, inputs[-1], f"different checkpoint files (only in the first: "
                                             f"{sorted(a - b)[:3]}, only in the second: {sorted(b - a)[:3]})")
    stages = [zero_stage_of(p, optim_names) for p in inputs]
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
        ranks = ranks_of_file(name)
        if ranks is not None:
            rank_shapes[ranks] = out.get("param_shapes")
        torch.save(out, os.path.join(tmp, name))
        done += 1
        logger.info(f"[{done}/{total}] {name}: {len(out['module'])} module tensors")
        del states, out
    for name in optim_names:
        shapes = rank_shapes.get(ranks_of_file(name))
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


