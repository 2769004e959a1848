"""Weight snapshots ("slots") in DeepSpeed's ZeRO checkpoint layout of the training's stage, weights only.

A slot is a folder `step_XXXXXXXX/` holding, for every (dp, tp) rank,
`zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt` (the model-states metadata DeepSpeed writes:
param_shapes, buffer_names, shared_params, ...) and `..._optim_states.pt` (the rank's fp32 flat
groups under DeepSpeed's keys for the stage: `fp32_flat_groups` at ZeRO-3; at ZeRO-1/2
`single_partition_of_fp32_groups` with its paddings; core.flat_layout), so DeepSpeed's own
`zero_to_fp32` consolidates it like any checkpoint. The trainers' EMA and SWA of the same step,
when enabled, sit in sub-folders `ema/` and `swa/` laid out the same way (each one consolidates on
its own). `manifest.json` (a `SlotManifest`: step, tokens, lr, layout, the averages present,
param shapes, a checksum per file) and then the empty `COMMITTED` marker are written last: a
folder without the marker is being written, or was torn by a crash, and is never read.

Every file is written atomically (core.files); a reader maps it, checks it against its checksum,
then unpickles the same mapped bytes weights-only (core.integrity, core.pickles: tensors backed by
the file, not copied, and no code run). Every way a slot can fail a reader is a `SlotError`, so the
sidecar can leave one slot out and go on.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterable, Optional

import torch

from core.files import fsync_dir, remove_path, serialize, stale_partials, step_name, step_of, write_file_atomic
from core.flat_layout import FlatLayout, LayoutMismatch
from core.integrity import ChecksumMismatch, load_verified, record_of
from core.run_dir import COMMITTED, MANIFEST, node_manifest
from core.zero_checkpoint import (
    ManifestError,
    SlotManifest,
    flat_groups_of,
    model_states_file,
    optim_states_content,
    optim_states_file,
    read_manifest_file,
)
from core.zero_folder import Cut, TensorSource, fill_flat_groups


class SlotError(RuntimeError):
    """A slot cannot be used."""


class SlotVanished(SlotError):
    """The slot was recycled (or never committed) while we looked at it: choose again."""


class SlotCorrupt(SlotError):
    """A file does not match the checksum its manifest recorded, or its manifest cannot be read."""


class SlotUnusable(SlotError):
    """A whole, readable slot that this reader cannot use: another layout, files on other nodes, an
    average it does not hold, an unreadable file."""


# ---------------------------------------------------------------------------------------------
# names


def kind_dir(slot_dir: str, kind: str) -> str:
    """Where a slot keeps the weights of one kind: "raw" at the top, averages in sub-folders."""
    return slot_dir if kind == "raw" else os.path.join(slot_dir, kind)


def kind_file(kind: str, name: str) -> str:
    """A file's name in the manifest, relative to the slot folder."""
    return name if kind == "raw" else f"{kind}/{name}"


# ---------------------------------------------------------------------------------------------
# writing


def write_shard(slot_dir: str, dp_rank: int, tp_rank: int, flat_groups: list[torch.Tensor],
                model_states: dict[str, Any], max_bytes_per_s: float = 0.0,
                mode: Optional[int] = None, layout: Optional[FlatLayout] = None) -> dict[str, dict]:
    """Write one rank's two files into slot_dir (files `mode`, folders 0700, when given): its flat
    groups as stored under `layout` (default ZeRO-3 of the model states' shapes; ZeRO-1/2 lean);
    returns {file name: {"bytes", "xxh3"}}."""
    os.makedirs(slot_dir, mode=0o700 if mode is not None else 0o777, exist_ok=True)
    layout = layout or FlatLayout.zero3(model_states["param_shapes"], model_states["dp_world_size"])
    optim_states = optim_states_content(layout, dp_rank, flat_groups, model_states.get("ds_version"))
    written = {}
    for name, obj in ((model_states_file(dp_rank, tp_rank), model_states),
                      (optim_states_file(dp_rank, tp_rank), optim_states)):
        data = serialize(obj)
        write_file_atomic(os.path.join(slot_dir, name), data, max_bytes_per_s, mode)
        written[name] = record_of(data)
    fsync_dir(slot_dir)
    return written


RESTART = "restart"  # a restart slot's sub-folder: each rank's optimizer moments
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's, per master flat group, in the partition's own layout


def moments_file(dp_rank: int, tp_rank: int) -> str:
    return f"{RESTART}/zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_moments.pt"


def write_moments(slot_dir: str, dp_rank: int, tp_rank: int, moments: dict[str, list[torch.Tensor]],
                  max_bytes_per_s: float = 0.0, mode: Optional[int] = None) -> dict[str, dict]:
    """One rank's optimizer moments ({name in MOMENTS: its flat groups, padded as the partition})
    into a restart slot; returns {file name: {"bytes", "xxh3"}} for the manifest."""
    name = moments_file(dp_rank, tp_rank)
    os.makedirs(os.path.dirname(os.path.join(slot_dir, name)), mode=0o700 if mode is not None else 0o777,
                exist_ok=True)
    data = serialize({key: moments[key] for key in MOMENTS})
    write_file_atomic(os.path.join(slot_dir, name), data, max_bytes_per_s, mode)
    fsync_dir(os.path.join(slot_dir, RESTART))
    return {name: record_of(data)}


def read_moments(slot_dir: str, dp_rank: int, tp_rank: int, manifest: SlotManifest) -> dict[str, list[torch.Tensor]]:
    """This rank's optimizer moments of a committed restart slot, checksum-verified."""
    if not manifest.restart:
        raise SlotUnusable(f"{slot_dir} is not a restart slot (weights only)")
    name = moments_file(dp_rank, tp_rank)
    moments = _read_verified(slot_dir, name, manifest)
    if not isinstance(moments, dict) or any(not isinstance(moments.get(key), list) for key in MOMENTS):
        raise SlotCorrupt(f"{slot_dir}/{name} holds no optimizer moments")
    return moments


BUDDY = "buddy"  # <root>/buddy/<node>/step_N/: another node's part of a restart slot (snapshot.replicate)


def buddy_path(root: str, node: str, step: int) -> str:
    """Where a node keeps its copy of `node`'s part of the restart slot of `step`."""
    return os.path.join(root, BUDDY, node, step_name(step))


def buddy_copies(root: str) -> list[tuple[str, int, str]]:
    """(node, step, path) of every committed buddy copy under root, oldest first. A copy is that
    node's part folder as it committed it (manifest, marker and files), so it reads as a slot."""
    found = []
    for node in sorted(os.listdir(os.path.join(root, BUDDY))) if os.path.isdir(os.path.join(root, BUDDY)) else []:
        for step, path, committed in list_slots(os.path.join(root, BUDDY, node)):
            if committed:
                found.append((node, step, path))
    return sorted(found, key=lambda copy: copy[1])


def remove_stale_copies(root: str) -> list[str]:
    """Removes what writers killed on this host left half written in a ring (slot files staged under
    `core.files.partial_name`, buddy copies in transfer) and returns their paths: they are in no
    listing, and would otherwise hold node-local memory until the node reboots."""
    folders = [root]
    buddies = os.path.join(root, BUDDY)
    if os.path.isdir(buddies):
        folders += [os.path.join(buddies, node) for node in sorted(os.listdir(buddies))]
    removed = [path for folder in folders for path in stale_partials(folder)]
    for path in removed:
        remove_path(path)
    return removed


def part_files(manifest: SlotManifest) -> list[str]:
    """Every file of a node's part of a committed slot, relative to its folder: what a copy of it
    holds (its markers last, so a copy written in this order is committed last)."""
    markers = [node_manifest(manifest.node)] if manifest.node is not None else []
    return [*manifest.files, *markers, MANIFEST, COMMITTED]


def model_states_metadata(param_shapes: list[dict[str, Any]], dp: int, tp: int, splits: dict[str, list[int]],
                          module: Optional[dict] = None, buffer_names: Optional[list[str]] = None,
                          shared_params: Optional[dict] = None) -> dict[str, Any]:
    """The model-states part of a DeepSpeed ZeRO checkpoint, which zero_to_fp32 needs to rebuild
    parameters from flat groups, plus ours: which dimension each split parameter is split along."""
    from core.deepspeed_compat import use_deepspeed_here

    deepspeed = use_deepspeed_here()
    return {"module": module or {}, "buffer_names": buffer_names or [], "param_shapes": param_shapes,
            "frozen_param_shapes": None, "frozen_param_fragments": None, "shared_params": shared_params or {},
            "dp_world_size": dp, "mp_world_size": tp, "ds_version": deepspeed.__version__,
            "tensor_parallel_layout": splits}


def write_weights(slot_dir: str, source: TensorSource, dp: int, tp: int, splits: dict[str, list[int]],
                  groups: Optional[list[list[str]]] = None, stage: int = 3) -> dict[str, dict]:
    """Cut full weights into every rank's files of a data × tensor layout at a ZeRO stage
    (DeepSpeed's files, which zero_to_fp32 reads; the inverse of consolidation; stage 1-2 laid out as
    FlatLayout.zero12), one rank in memory at a time. `splits`: {name: [dim, stride]} of the
    tensor-parallel splits; `groups`: the parameter names of each flat group, in order (default: one
    group of every tensor of the source). Returns {file name: {"bytes", "xxh3"}} for the manifest."""
    groups = groups or [source.names()]
    files: dict[str, dict] = {}
    for tp_rank in range(tp):
        shapes = []
        for group in groups:
            shape = {}
            for name in group:
                full = list(source.shape(name))
                if name in splits and tp > 1:
                    dim, stride = splits[name]
                    if full[dim] % (tp * stride):
                        raise LayoutMismatch(f"{name}: dimension {dim} of {tuple(full)} does not split into "
                                             f"{tp} tensor-parallel slices of {stride} blocks")
                    full[dim] //= tp
                shape[name] = torch.Size(full)
            shapes.append(shape)
        layout = FlatLayout.zero3(shapes, dp) if stage == 3 else FlatLayout.zero12(stage, shapes, dp)
        model_states = model_states_metadata(shapes, dp, tp, splits)
        for dp_rank in range(dp):
            flat = fill_flat_groups(source, layout, Cut(dp_rank, dp, tp_rank, tp), splits)
            files.update(write_shard(slot_dir, dp_rank, tp_rank, flat, model_states, layout=layout))
            del flat
    return files


def commit(slot_dir: str, manifest: SlotManifest, mode: Optional[int] = None) -> None:
    """Write the manifest, then the marker: the slot is readable from this moment on. A folder is
    committed once, by one writer: a second commit is a bug, and refused."""
    if is_committed(slot_dir):
        raise SlotError(f"{slot_dir} is already committed (one committer per folder)")
    fsync_dir(slot_dir)  # the files' names are durable before the manifest that vouches for them
    if manifest.node is not None:
        write_file_atomic(os.path.join(slot_dir, node_manifest(manifest.node)), manifest.to_json(), mode=mode)
    write_file_atomic(os.path.join(slot_dir, MANIFEST), manifest.to_json(), mode=mode)
    write_file_atomic(os.path.join(slot_dir, COMMITTED), b"", mode=mode)
    fsync_dir(slot_dir)


def remove_slot(slot_dir: str) -> None:
    """Uncommit first, so a reader never sees a committed slot with files missing, then delete."""
    try:
        os.remove(os.path.join(slot_dir, COMMITTED))
    except FileNotFoundError:
        pass
    shutil.rmtree(slot_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading


def is_committed(slot_dir: str) -> bool:
    return os.path.isfile(os.path.join(slot_dir, COMMITTED))


def list_slots(root: str) -> list[tuple[int, str, bool]]:
    """(step, path, committed) of every slot folder under root, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = step_of(name)
        if step is not None:
            path = os.path.join(root, name)
            found.append((step, path, is_committed(path)))
    return sorted(found)


def committed_steps(root: str) -> list[int]:
    return [step for step, _, committed in list_slots(root) if committed]


def slot_path(root: str, step: int) -> str:
    return os.path.join(root, step_name(step))


def read_manifest(slot_dir: str) -> SlotManifest:
    if not is_committed(slot_dir):
        raise SlotVanished(f"{slot_dir} is not committed")
    try:
        return read_manifest_file(slot_dir)
    except FileNotFoundError:
        raise SlotVanished(f"{slot_dir} lost its manifest") from None
    except ManifestError as e:
        raise SlotCorrupt(str(e)) from None
    except (ValueError, TypeError, KeyError) as e:  # not JSON, or not a manifest's fields
        raise SlotCorrupt(f"{slot_dir}/{MANIFEST} cannot be read: {str(e).splitlines()[0]}") from None


def _read_verified(slot_dir: str, name: str, manifest: SlotManifest) -> Any:
    """One file of a committed slot, unpickled (weights-only) once its bytes match the manifest's
    checksum; every failure is a SlotError naming the file."""
    expected = manifest.files.get(name)
    if expected is None:
        away = manifest.elsewhere(slot_dir)
        raise SlotUnusable(away or f"{slot_dir} has no {name} in its manifest (written with layout "
                                   f"data {manifest.dp} × tensor {manifest.tp})")
    try:
        obj = load_verified(os.path.join(slot_dir, name), expected)
    except FileNotFoundError:
        raise SlotVanished(f"{slot_dir}/{name} disappeared while reading") from None
    except ChecksumMismatch as e:
        if not is_committed(slot_dir):
            raise SlotVanished(f"{slot_dir} was recycled while reading") from None
        raise SlotCorrupt(str(e)) from None
    except (ValueError, OSError) as e:  # verified bytes that do not unpickle (weights-only), or an I/O error
        raise SlotCorrupt(str(e).splitlines()[0] if str(e) else f"{slot_dir}/{name}: {type(e).__name__}") from None
    if not is_committed(slot_dir):  # recycled after we opened it: the data may be from elsewhere
        raise SlotVanished(f"{slot_dir} was recycled while reading")
    return obj


def read_shard(slot_dir: str, dp_rank: int, tp_rank: int, manifest: Optional[SlotManifest] = None,
               kind: str = "raw") -> tuple[list[torch.Tensor], SlotManifest]:
    """This rank's fp32 flat groups of a committed slot (the raw weights, or one of the averages
    its manifest lists), checksum-verified; and the manifest."""
    manifest = manifest or read_manifest(slot_dir)
    if kind != "raw" and kind not in manifest.averages:
        raise SlotUnusable(f"{slot_dir} holds no {kind} average")
    name = kind_file(kind, optim_states_file(dp_rank, tp_rank))
    optim = _read_verified(slot_dir, name, manifest)
    try:
        flat = flat_groups_of(optim)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise SlotCorrupt(f"{slot_dir}/{name} holds no fp32_flat_groups: not a snapshot file") from None
    problem = _flat_groups_problem(flat, manifest, dp_rank)
    if problem:
        raise SlotCorrupt(f"{slot_dir}/{name} {problem}")
    return flat, manifest


def _flat_groups_problem(flat: list, manifest: SlotManifest, dp_rank: int) -> Optional[str]:
    """None when `flat` are fp32 flat groups that the manifest's layout places on `dp_rank`: what
    the sidecar and a restart may add up and copy into a model without looking again."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.dtype == torch.float32 for t in flat):
        return "holds flat groups that are not 1-D fp32 tensors"
    if len(flat) != len(manifest.param_shapes):
        return f"holds {len(flat)} flat groups, its manifest's layout {len(manifest.param_shapes)}"
    try:
        manifest.layout().spans(dp_rank, [t.numel() for t in flat])
    except LayoutMismatch as e:
        return f"does not fit its manifest's layout: {e}"
    return None


def read_model_states(slot_dir: str, dp_rank: int, tp_rank: int, manifest: SlotManifest) -> dict[str, Any]:
    return _read_verified(slot_dir, model_states_file(dp_rank, tp_rank), manifest)


def check_compatible(manifests: Iterable[SlotManifest]) -> None:
    """Refuse to mix slots of different layouts or parameter shapes, naming the difference."""
    manifests = list(manifests)
    first = manifests[0]
    for other in manifests[1:]:
        if (other.dp, other.tp, other.zero_stage) != (first.dp, first.tp, first.zero_stage):
            raise LayoutMismatch(f"cannot average step {first.step} (data {first.dp} × tensor {first.tp}, ZeRO-"
                                 f"{first.zero_stage}) with step {other.step} (data {other.dp} × tensor {other.tp}, "
                                 f"ZeRO-{other.zero_stage})")
        if (other.param_paddings, other.partition_sizes) != (first.param_paddings, first.partition_sizes):
            raise LayoutMismatch(f"cannot average step {first.step} with step {other.step}: their ZeRO-{first.zero_stage} "
                                 f"partitions differ (paddings or partition sizes)")
        if other.param_shapes != first.param_shapes:
            a = {n: s for g in first.param_shapes for n, s in g}
            b = {n: s for g in other.param_shapes for n, s in g}
            diff = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            detail = f"e.g. {diff[0]}: {a.get(diff[0])} vs {b.get(diff[0])}" if diff else "parameter order differs"
            raise LayoutMismatch(f"cannot average step {first.step} with step {other.step}: "
                                 f"parameter shapes differ ({detail})")
