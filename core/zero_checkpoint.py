"""DeepSpeed's ZeRO checkpoint files, tensor parallel or not: their names, how their flat groups are
laid out (core.flat_layout, stages 1-3), tensor-parallel slicing, and what a committed folder records.

Per (dp, tp) rank a folder holds `zero_pp_rank_{dp}_mp_rank_{tp:02d}_model_states.pt` (parameter
shapes, buffers, shared aliases; DeepSpeed's own ZeRO-1/2 checkpoints keep one `mp_rank_{tp:02d}_
model_states.pt` instead) and `..._optim_states.pt` (this rank's fp32 flat groups: `fp32_flat_groups`
at ZeRO-3, `single_partition_of_fp32_groups` at 1-2). Consolidation (core.zero_folder,
equal to DeepSpeed's `zero_to_fp32` per tensor-parallel rank) merges the mp_rank slices along the
dimension each parameter was split on, which the launcher records (`tensor_parallel_layout`:
{name: [dim, stride]}) in slot manifests, checkpoint run_state.json files and model-states files.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from core import pickles
from core.files import write_file_atomic
from core.flat_layout import FlatLayout, LayoutMismatch
from core.integrity import FileRecord, load_verified
from core.log import rank_span
from core.records import LARGEST, RecordError, file_records_problem, from_json, inside_name, sealed_json
from core.run_dir import MANIFEST, RUN_STATE, node_manifest

MANIFEST_FORMAT = 2
MAX_RANKS = 1 << 20  # more ranks than any run has: a layout beyond it is a damaged record


@dataclass
class SlotManifest:
    """What a committed folder of ZeRO-3 files holds (a snapshot slot, or an average of slots):
    written once by its committer as manifest.json, read through `read_manifest`.

    On node-local storage each node commits its own part of a slot: `node` names it, `files` lists
    the files of that node's ranks only, and `nodes` says which node holds which ranks' files.
    A manifest with `node` None describes a whole folder (shared storage)."""

    kind: str  # raw (the trainers' snapshot), lawa (the sidecar's best average), offline (averaging.offline)
    step: int
    tokens: int
    lr: Optional[float]
    dp: int
    tp: int
    param_shapes: list  # DeepSpeed's param_shapes, as JSON: [[[name, shape], ...], ...] per sub-group
    files: dict[str, dict[str, Any]]  # name relative to the folder -> {"bytes", "xxh3"}
    tensor_parallel_layout: dict[str, list[int]] = field(default_factory=dict)
    zero_stage: int = 3  # the layout of the flat groups (core.flat_layout); at 1-2 also the two below
    param_paddings: list[list[int]] = field(default_factory=list)
    partition_sizes: list[int] = field(default_factory=list)
    ds_version: Optional[str] = None
    averages: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw slots: EMA/SWA present
    steps_averaged: list[int] = field(default_factory=list)  # averages: the steps, newest first
    merge_weights: list[float] = field(default_factory=list)  # averages: each step's weight, same order
    merge: Optional[str] = None  # lawa: the name of the merge (lawa.merges) it is the best of
    val_loss: Optional[float] = None  # lawa: the held-out loss that made it the best
    node: Optional[str] = None  # the node whose part of the slot this folder holds; None: all of it
    nodes: dict[str, list[int]] = field(default_factory=dict)  # node -> the ranks whose files it holds
    # Restart slots (snapshot.restart_every): the optimizer's step count of each flat group; each
    # rank's moments are in restart/ (averaging.slots.write_moments). Empty: weights only.
    restart: dict[str, Any] = field(default_factory=dict)
    # raw slots: the id of the run that wrote it (<run_dir>/run_id): a ring that another run, or an
    # earlier run in a recreated run directory, left at the same path never restarts this one
    run: Optional[str] = None
    format: int = MANIFEST_FORMAT

    def check(self) -> Optional[str]:
        """What a manifest's types cannot say about it (core.records.from_json calls it); None: fine."""
        if self.format not in (1, MANIFEST_FORMAT):
            return f"manifest format {self.format}, this version reads {MANIFEST_FORMAT}"
        problem = (_layout_problem(self.step, self.tokens, self.dp, self.tp, self.zero_stage)
                   or file_records_problem(self.files) or _shapes_problem(self.param_shapes))
        if problem:
            return problem
        if any(p < 0 for p in self.partition_sizes) or any(p < 0 for group in self.param_paddings for p in group):
            return "a partition size or padding is negative"
        for node, ranks in self.nodes.items():
            if not inside_name(node) or "/" in node:
                return f"nodes names {node!r}, not a node"
            if any(not 0 <= r < self.dp * self.tp for r in ranks):
                return f"nodes[{node!r}] names a rank outside data {self.dp} × tensor {self.tp}"
        if self.node is not None and self.node not in self.nodes:
            return f"node {self.node!r} is not among its nodes"
        try:
            self.layout()
        except LayoutMismatch as e:
            return f"its layout cannot be: {e}"
        return None

    def shapes(self) -> list[dict[str, torch.Size]]:
        return shapes_from_json(self.param_shapes)

    def layout(self) -> FlatLayout:
        return FlatLayout(self.zero_stage, self.dp, self.shapes(), self.param_paddings, self.partition_sizes)

    def to_json(self) -> str:
        return sealed_json(self)

    def elsewhere(self, folder: str) -> Optional[str]:
        """None when this folder holds every rank's files; else one line saying where the others are."""
        if self.node is None:
            return None
        away = {node: ranks for node, ranks in self.nodes.items() if node != self.node}
        here = self.nodes.get(self.node, [])
        if not away or all(os.path.isfile(os.path.join(folder, optim_states_file(r // self.tp, r % self.tp)))
                           for ranks in away.values() for r in ranks):
            return None
        there = "; ".join(f"{rank_span(ranks)} on {node}" for node, ranks in away.items())
        first = next(iter(away))
        return (f"{folder} is node-local: it holds the files of {rank_span(here)} ({self.node}) only, the "
                f"others are under the same path on their nodes ({there}); copy them here (e.g. "
                f"rsync -a {first}:{folder}/ {folder}/) and run again, or use the run's shared lawa_best/ or "
                f"checkpoints/")


class ManifestError(RecordError):
    """A manifest.json that cannot be read (torn, another version, or not ours); one line naming it."""


def _layout_problem(step: int, tokens: int, dp: int, tp: int, zero_stage: int) -> Optional[str]:
    if step < 0 or tokens < 0:
        return f"step {step} or tokens {tokens} is negative"
    if not (1 <= dp <= MAX_RANKS and 1 <= tp <= MAX_RANKS and dp * tp <= MAX_RANKS):
        return f"data {dp} × tensor {tp} is not a layout of 1 to {MAX_RANKS} ranks"
    if zero_stage not in (0, 1, 2, 3):
        return f"zero_stage {zero_stage} is not a ZeRO stage"
    return None


def _shapes_problem(param_shapes: list) -> Optional[str]:
    for group in param_shapes:
        if not isinstance(group, list) or not all(
                isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], list)
                and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < LARGEST for d in pair[1])
                for pair in group):
            return "param_shapes is not a list of [name, shape] per group"
    return None


def read_manifest_file(folder: str) -> SlotManifest:
    """The manifest of a committed folder (callers check COMMITTED first: averaging.slots), every
    field checked (core.records); ManifestError in one line naming it when it cannot be used."""
    try:
        manifest = from_json(SlotManifest, os.path.join(folder, MANIFEST))
        if manifest.node is None:
            return manifest
        # Node parts gathered into this folder (rsync from each node) complete its file list.
        present = {manifest.node}
        for node in manifest.nodes:
            part = os.path.join(folder, node_manifest(node))
            if node not in present and os.path.isfile(part):
                manifest.files.update(from_json(SlotManifest, part).files)
                present.add(node)
        if present >= set(manifest.nodes):
            manifest.node = None
        return manifest
    except RecordError as e:
        raise ManifestError(str(e)) from None


@dataclass
class RunState:
    """What a complete checkpoint records beside DeepSpeed's files: its run_state.json, the marker
    that makes it count, written last, once every file in the folder is durable. `files` holds each
    file's record (size, xxh3), by which resume and every reader verify the folder (empty in
    checkpoints from before records: those are read as they are)."""

    step: int
    tokens: int
    dp: int
    tp: int
    tensor_parallel_layout: dict[str, list[int]] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    zero_stage: int = 3  # (checkpoints from before stages 1-2 trained were all ZeRO-3)

    def write(self, folder: str) -> None:
        write_file_atomic(os.path.join(folder, RUN_STATE), sealed_json(self))

    def check(self) -> Optional[str]:
        return _layout_problem(self.step, self.tokens, self.dp, self.tp, self.zero_stage) or file_records_problem(self.files)

    @classmethod
    def read(cls, folder: str) -> RunState:
        """A checkpoint's run state, every field checked (core.records): RecordError in one line naming
        the file when it cannot be used."""
        return from_json(cls, os.path.join(folder, RUN_STATE))


def recorded_files(folder: str) -> Optional[dict[str, FileRecord]]:
    """The file records of a folder of ZeRO files, by file name: from a slot's or an average's
    manifest (for an ema/ or swa/ sub-folder, its slot's), or a checkpoint's run_state.json. None
    for a folder that records none (another tool's checkpoint, or one of ours from before records)."""
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return dict(read_manifest_file(folder).files)
    parent, kind = os.path.split(os.path.normpath(folder))
    if os.path.isfile(os.path.join(parent, MANIFEST)):
        prefix = f"{kind}/"
        return {name[len(prefix):]: record for name, record in read_manifest_file(parent).files.items()
                if name.startswith(prefix)}
    if os.path.isfile(os.path.join(folder, RUN_STATE)):
        return RunState.read(folder).files or None
    return None


def load_recorded(path: str, records: Optional[dict[str, FileRecord]]) -> Any:
    """A torch file of a folder of ZeRO files, verified against the folder's records (`recorded_files`;
    None: a folder that keeps none, read as it is); a file the records do not list is refused."""
    expected = None
    if records is not None:
        expected = records.get(os.path.basename(path))
        if expected is None:
            raise ManifestError(f"{path} is not among the files its folder records: not written with them")
    return load_verified(path, expected)


def model_states_file(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"


def optim_states_file(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


_ZERO_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")


def zero_files(folder: str) -> tuple[list[str], list[str]]:
    """A DeepSpeed tag folder's model-states and optimizer-states file names, sorted."""
    names = sorted(os.listdir(folder))
    return [n for n in names if n.endswith("model_states.pt")], [n for n in names if n.endswith("optim_states.pt")]


def ranks_of_file(name: str) -> Optional[tuple[int, int]]:
    """(data-parallel, tensor-parallel) rank of a ZeRO file's name (zero_pp_rank_D_mp_rank_TT_...), else None."""
    match = _ZERO_FILE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def zero_stage_of(folder: str, optim_names: list[str]) -> int:
    """The ZeRO stage a tag folder was written at: its first optimizer-states file says (0: none, the
    optimizer living in the model-states file)."""
    if not optim_names:
        return 0
    inner = load_recorded(os.path.join(folder, optim_names[0]), recorded_files(folder))["optimizer_state_dict"]
    return int(inner["zero_stage"])


_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_|averages_dp(\d+)_tp(\d+)")


def writer_rank(name: str, tp: int) -> int:
    """The rank that writes a checkpoint's file, by its name: DeepSpeed's (zero_pp_rank_{dp}_mp_rank_{tp}_...;
    mp_rank_{tp}_... by data-parallel rank 0) or ours (averages_dp{d}_tp{t}.pt); rank 0 for any other."""
    match = _RANK_IN_NAME.search(name)
    if match is None:
        return 0
    if match.group(3) is not None:
        return int(match.group(3)) * tp + int(match.group(4))
    return int(match.group(1) or 0) * tp + int(match.group(2))


# ---------------------------------------------------------------------------------------------
# the flat-partition layout (core.flat_layout) as files and manifests record it


def layout_of(param_shapes: list[dict[str, Any]], dp: int, optim_states: dict[str, Any]) -> FlatLayout:
    """The layout of a folder's flat groups, from its parameter shapes and any rank's optimizer
    states (DeepSpeed's keys: zero_stage; at stage 1-2 param_alignment_paddings, and the rank's
    group_paddings, which with its lean partition give each group's partition size)."""
    stage = int(optim_states.get("zero_stage", 3))
    if stage == 3:
        return FlatLayout.zero3(param_shapes, dp)
    lean = optim_states["single_partition_of_fp32_groups"]
    tails = optim_states.get("group_paddings") or [0] * len(lean)
    paddings = optim_states.get("param_alignment_paddings") or [[0] * len(shapes) for shapes in param_shapes]
    return FlatLayout(stage, dp, param_shapes, [list(p) for p in paddings],
                      [t.numel() + int(tail) for t, tail in zip(lean, tails)])


def optim_states_content(layout: FlatLayout, rank: int, flat_groups: list[torch.Tensor],
                         ds_version: Optional[str]) -> dict[str, Any]:
    """A rank's optimizer-states file of weights only, in DeepSpeed's keys for the layout's stage,
    so that zero_to_fp32 consolidates it like any checkpoint (`flat_groups`: as stored, lean at 1-2)."""
    if layout.stage == 3:
        inner = {"zero_stage": 3, "partition_count": layout.dp, "fp32_flat_groups": flat_groups}
    else:
        inner = {"zero_stage": layout.stage, "partition_count": layout.dp,
                 "single_partition_of_fp32_groups": flat_groups, "param_alignment_paddings": layout.param_paddings,
                 "group_paddings": [size - f.numel() for size, f in zip(layout.partition_sizes, flat_groups)]}
    return {"optimizer_state_dict": inner, "ds_version": ds_version}


def flat_groups_key(stage: int) -> str:
    """Where DeepSpeed's optimizer-states files keep the rank's fp32 flat groups, by ZeRO stage."""
    return "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"


def flat_groups_of(optim_states: dict[str, Any]) -> list[torch.Tensor]:
    """A rank's fp32 flat groups from its optimizer-states file, any stage."""
    inner = optim_states["optimizer_state_dict"]
    return list(inner[flat_groups_key(int(inner.get("zero_stage", 3)))])


def shapes_to_json(param_shapes: list[dict[str, Any]]) -> list[list[list]]:
    return [[[name, list(shape)] for name, shape in shapes.items()] for shapes in param_shapes]


def shapes_from_json(data: list[list[list]]) -> list[dict[str, torch.Size]]:
    return [{name: torch.Size(shape) for name, shape in group} for group in data]


# ---------------------------------------------------------------------------------------------
# tensor-parallel slices


def split_tensor(full: torch.Tensor, dim: int, stride: int, size: int) -> list[torch.Tensor]:
    """The `size` tensor-parallel slices of `full` along `dim`. With stride s the dim holds s fused
    blocks (e.g. q, k, v): each block is split separately so every rank gets whole heads of each."""
    blocks = full.chunk(stride, dim=dim)
    return [torch.cat([b.chunk(size, dim=dim)[r] for b in blocks], dim=dim).contiguous() for r in range(size)]


def merge_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of split_tensor: the full tensor from every rank's slice, in rank order."""
    blocks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([torch.cat([b[i] for b in blocks], dim=dim) for i in range(stride)], dim=dim)


# ---------------------------------------------------------------------------------------------
# what a folder records (consolidation itself: core.zero_folder)


def tensor_parallel_layout_of(folder: str) -> Optional[dict[str, list[int]]]:
    """The recorded split dimensions: from a slot manifest, a checkpoint's run_state.json, or the
    model-states file of mp rank 0."""
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        return read_manifest_file(folder).tensor_parallel_layout
    if os.path.isfile(os.path.join(folder, RUN_STATE)):
        return RunState.read(folder).tensor_parallel_layout
    states = sorted(glob.glob(os.path.join(folder, "*mp_rank_00_model_states.pt")))
    if states:
        return pickles.load(states[0]).get("tensor_parallel_layout")
    return None


def check_complete(folder: str) -> None:
    """Refuse, in one line, a node-local slot whose other ranks' files are on other nodes."""
    for place in (folder, os.path.dirname(folder)):  # a slot, or its ema/ or swa/ sub-folder
        if os.path.isfile(os.path.join(place, MANIFEST)):
            away = read_manifest_file(place).elsewhere(place)
            if away:
                raise ValueError(away)
            return
