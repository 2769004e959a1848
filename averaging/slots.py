"""Weight snapshots ("slots") in DeepSpeed's ZeRO-3 checkpoint layout, weights only.

A slot is a folder `step_XXXXXXXX/` holding, for every (dp, tp) rank,
`zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt` (the model-states metadata DeepSpeed writes:
param_shapes, buffer_names, shared_params, ...) and `..._optim_states.pt` (only
`optimizer_state_dict.fp32_flat_groups`, `zero_stage` and `partition_count`), so DeepSpeed's own
`zero_to_fp32` consolidates it like any checkpoint. The trainers' EMA and SWA of the same step,
when enabled, sit in sub-folders `ema/` and `swa/` laid out the same way (each one consolidates on
its own). `manifest.json` (step, tokens, lr, layout, the averages present,
param shapes, a checksum per file) and then the empty `COMMITTED` marker are written last: a
folder without the marker is being written, or was torn by a crash, and is never read.

Every file is written under a temporary name, fsynced and renamed, and read back whole and
checked against its checksum before it is unpickled.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
import uuid
from typing import Any, Iterable, Optional

import torch
import xxhash

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
SLOT_PREFIX = "step_"


class SlotError(RuntimeError):
    """A slot cannot be used."""


class SlotVanished(SlotError):
    """The slot was recycled (or never committed) while we looked at it: choose again."""


class SlotCorrupt(SlotError):
    """A file does not match the checksum its manifest recorded."""


class LayoutMismatch(SlotError):
    """Slots of different layouts or parameter shapes cannot be averaged."""


# ---------------------------------------------------------------------------------------------
# names


def slot_name(step: int) -> str:
    return f"{SLOT_PREFIX}{step:08d}"


def slot_step(name: str) -> Optional[int]:
    if name.startswith(SLOT_PREFIX) and name[len(SLOT_PREFIX):].isdigit():
        return int(name[len(SLOT_PREFIX):])
    return None


def kind_dir(slot_dir: str, kind: str) -> str:
    """Where a slot keeps the weights of one kind: "raw" at the top, averages in sub-folders."""
    return slot_dir if kind == "raw" else os.path.join(slot_dir, kind)


def kind_file(kind: str, name: str) -> str:
    """A file's name in the manifest, relative to the slot folder."""
    return name if kind == "raw" else f"{kind}/{name}"


def model_states_file(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


# ---------------------------------------------------------------------------------------------
# the flat-partition layout


def partition_numel(numel: int, dp: int) -> int:
    """ZeRO-3 gives every rank ceil(numel / dp) elements of each parameter; the last ones pad."""
    return math.ceil(numel / dp)


def _partitions(flat_groups: list[torch.Tensor], param_shapes: list[dict[str, Any]],
                dp: int) -> list[tuple[str, torch.Tensor, int]]:
    """(name, view of its partition, its full numel) for every parameter, in flat order.

    Parameters are laid out in `param_shapes` order across the flat groups, each partition whole
    inside one group; walking them with one cursor works whether DeepSpeed reports one shape dict
    per flat group or fewer (it splits large groups into sub-groups of `sub_group_size`)."""
    out, g, offset = [], 0, 0
    for shapes in param_shapes:
        for name, shape in shapes.items():
            numel = math.prod(shape)
            part = partition_numel(numel, dp)
            while g < len(flat_groups) and offset + part > flat_groups[g].numel():
                if offset != flat_groups[g].numel():
                    raise LayoutMismatch(f"{name}'s partition of {part} elements straddles flat group {g} "
                                         f"({flat_groups[g].numel()} elements, {offset} used)")
                g, offset = g + 1, 0
            if g == len(flat_groups):
                raise LayoutMismatch(f"flat groups of {[f.numel() for f in flat_groups]} elements end before "
                                     f"{name}: the parameter shapes need more at data-parallel size {dp}")
            out.append((name, flat_groups[g][offset: offset + part], numel))
            offset += part
    used = sum(f.numel() for f in flat_groups[:g]) + offset
    if used != sum(f.numel() for f in flat_groups):
        raise LayoutMismatch(f"flat groups hold {sum(f.numel() for f in flat_groups)} elements but the "
                             f"parameter shapes at data-parallel size {dp} account for {used}")
    return out


def zero_padding(flat_groups: list[torch.Tensor], param_shapes: list[dict[str, Any]], dp_rank: int, dp: int) -> None:
    """Zero, in place, the elements of rank `dp_rank`'s partitions that lie past each parameter's end.

    DeepSpeed leaves them uninitialised (values up to 1e33 have been seen), which poisons any norm,
    finiteness check or average taken over the flat tensor."""
    for _, view, numel in _partitions(flat_groups, param_shapes, dp):
        part = view.numel()
        valid = min(max(numel - dp_rank * part, 0), part)
        view[valid:].zero_()


def split_partitions(flat_groups: list[torch.Tensor], param_shapes: list[dict[str, Any]],
                     dp: int) -> dict[str, torch.Tensor]:
    """Views of each parameter's partition (ceil(numel/dp) elements, padding included) by name."""
    return {name: view for name, view, _ in _partitions(flat_groups, param_shapes, dp)}


def shapes_to_json(param_shapes: list[dict[str, Any]]) -> list[list[list]]:
    return [[[name, list(shape)] for name, shape in shapes.items()] for shapes in param_shapes]


def shapes_from_json(data: list[list[list]]) -> list[dict[str, torch.Size]]:
    return [{name: torch.Size(shape) for name, shape in group} for group in data]


# ---------------------------------------------------------------------------------------------
# writing


def _checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def fsync_dir(path: str) -> None:
    """Make renames inside `path` durable (a marker must never outlive the files it vouches for)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes | memoryview, max_bytes_per_s: float = 0.0) -> None:
    """Write under a temporary name, fsync, rename; optionally at no more than max_bytes_per_s."""
    # Unique per writer: on a shared filesystem several nodes may commit the same slot.
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    view = memoryview(data)
    chunk = 1 << 20 if max_bytes_per_s > 0 else 64 << 20
    start = time.monotonic()
    with open(tmp, "wb") as f:
        for pos in range(0, len(view), chunk):
            f.write(view[pos: pos + chunk])
            if max_bytes_per_s > 0:
                ahead = min(pos + chunk, len(view)) / max_bytes_per_s - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def serialize(obj: Any) -> memoryview:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def write_shard(slot_dir: str, dp_rank: int, tp_rank: int, flat_groups: list[torch.Tensor],
                model_states: dict[str, Any], max_bytes_per_s: float = 0.0) -> dict[str, dict]:
    """Write one rank's two files into slot_dir; returns {file name: {"bytes", "xxh3"}}."""
    os.makedirs(slot_dir, exist_ok=True)
    optim_states = {
        "optimizer_state_dict": {
            "zero_stage": 3,
            "partition_count": model_states["dp_world_size"],
            "fp32_flat_groups": flat_groups,
        },
        "ds_version": model_states.get("ds_version"),
    }
    written = {}
    for name, obj in ((model_states_file(dp_rank, tp_rank), model_states),
                      (optim_states_file(dp_rank, tp_rank), optim_states)):
        data = serialize(obj)
        write_file_atomic(os.path.join(slot_dir, name), data, max_bytes_per_s)
        written[name] = {"bytes": len(data), "xxh3": _checksum(data)}
    fsync_dir(slot_dir)
    return written


def commit(slot_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest, then the marker: the slot is readable from this moment on."""
    write_file_atomic(os.path.join(slot_dir, MANIFEST), json.dumps({"format": FORMAT_VERSION, **manifest},
                                                                    indent=1).encode())
    write_file_atomic(os.path.join(slot_dir, COMMITTED), b"")
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
        step = slot_step(name)
        if step is not None:
            path = os.path.join(root, name)
            found.append((step, path, is_committed(path)))
    return sorted(found)


def committed_steps(root: str) -> list[int]:
    return [step for step, _, committed in list_slots(root) if committed]


def read_manifest(slot_dir: str) -> dict[str, Any]:
    if not is_committed(slot_dir):
        raise SlotVanished(f"{slot_dir} is not committed")
    try:
        with open(os.path.join(slot_dir, MANIFEST)) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SlotVanished(f"{slot_dir} lost its manifest") from None


def _read_verified(slot_dir: str, name: str, manifest: dict[str, Any]) -> Any:
    expected = manifest["files"].get(name)
    if expected is None:
        raise LayoutMismatch(f"{slot_dir} has no {name} in its manifest (written with layout "
                             f"data {manifest['dp']} × tensor {manifest['tp']})")
    try:
        with open(os.path.join(slot_dir, name), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise SlotVanished(f"{slot_dir}/{name} disappeared while reading") from None
    if len(data) != expected["bytes"] or _checksum(data) != expected["xxh3"]:
        if not is_committed(slot_dir):
            raise SlotVanished(f"{slot_dir} was recycled while reading")
        raise SlotCorrupt(f"{slot_dir}/{name} does not match its checksum")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def read_shard(slot_dir: str, dp_rank: int, tp_rank: int, manifest: Optional[dict[str, Any]] = None,
               kind: str = "raw") -> tuple[list[torch.Tensor], dict[str, Any]]:
    """This rank's fp32 flat groups of a committed slot (the raw weights, or one of the averages
    its manifest lists), checksum-verified; and the manifest."""
    manifest = manifest or read_manifest(slot_dir)
    if kind != "raw" and kind not in manifest.get("averages", {}):
        raise LayoutMismatch(f"{slot_dir} holds no {kind} average")
    optim = _read_verified(slot_dir, kind_file(kind, optim_states_file(dp_rank, tp_rank)), manifest)
    if not is_committed(slot_dir):  # recycled after we opened it: the data may be from elsewhere
        raise SlotVanished(f"{slot_dir} was recycled while reading")
    return optim["optimizer_state_dict"]["fp32_flat_groups"], manifest


def read_model_states(slot_dir: str, dp_rank: int, tp_rank: int, manifest: dict[str, Any]) -> dict[str, Any]:
    states = _read_verified(slot_dir, model_states_file(dp_rank, tp_rank), manifest)
    if not is_committed(slot_dir):
        raise SlotVanished(f"{slot_dir} was recycled while reading")
    return states


def check_compatible(manifests: Iterable[dict[str, Any]]) -> None:
    """Refuse to mix slots of different layouts or parameter shapes, naming the difference."""
    manifests = list(manifests)
    first = manifests[0]
    for other in manifests[1:]:
        if (other["dp"], other["tp"]) != (first["dp"], first["tp"]):
            raise LayoutMismatch(f"cannot average step {first['step']} (data {first['dp']} × tensor {first['tp']}) "
                                 f"with step {other['step']} (data {other['dp']} × tensor {other['tp']})")
        if other["param_shapes"] != first["param_shapes"]:
            a = {n: s for g in first["param_shapes"] for n, s in g}
            b = {n: s for g in other["param_shapes"] for n, s in g}
            diff = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            detail = f"e.g. {diff[0]}: {a.get(diff[0])} vs {b.get(diff[0])}" if diff else "parameter order differs"
            raise LayoutMismatch(f"cannot average step {first['step']} with step {other['step']}: "
                                 f"parameter shapes differ ({detail})")
