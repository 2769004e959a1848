"""LAWA math and the slot format, single process: the pure functions the sidecar is built from."""
from __future__ import annotations

import dataclasses
import math
import os
from collections import OrderedDict

import pytest
import torch

from averaging import slots
from averaging.lawa import average_shards, average_state_dicts, average_tensors, select_spaced
from core import zero_checkpoint
from core.files import step_name
from core.flat_layout import FlatLayout, LayoutMismatch, chunk_numel, views, zero_padding


def test_select_spaced_takes_the_newest_k_at_least_spacing_apart():
    steps = list(range(100, 1100, 100))  # 100 .. 1000
    assert select_spaced(steps, k=5, spacing=100) == [1000, 900, 800, 700, 600]
    assert select_spaced(steps, k=3, spacing=200) == [1000, 800, 600]
    assert select_spaced(steps, k=3, spacing=250) == [1000, 700, 400]
    assert select_spaced([5, 300], k=5, spacing=100) == [300, 5]  # short history: fewer than k
    assert select_spaced([], k=5, spacing=1) == []


def test_average_tensors_is_the_fp32_mean():
    a, b, c = torch.randn(7), torch.randn(7), torch.randn(7)
    assert torch.allclose(average_tensors([a, b, c]), (a + b + c) / 3, atol=1e-7)
    half = average_tensors([a.bfloat16(), b.bfloat16()])
    assert half.dtype == torch.float32
    with pytest.raises(ValueError, match="shapes"):
        average_tensors([a, torch.randn(3)])


def shapes(**named) -> OrderedDict:
    return OrderedDict((name, torch.Size(shape)) for name, shape in named.items())


# Two flat groups, parameter sizes chosen so that most do not divide by dp=3 (padding).
PARAM_SHAPES = [shapes(w1=(5, 7), w2=(4, 4)), shapes(b1=(7,), b2=(1,))]


def partition(full: dict[str, torch.Tensor], dp: int, rank: int) -> list[torch.Tensor]:
    """What ZeRO-3 keeps on `rank`: each parameter's ceil(numel/dp) chunk, padded, concatenated."""
    groups = []
    for group in PARAM_SHAPES:
        chunks = []
        for name in group:
            flat = full[name].flatten()
            part = chunk_numel(flat.numel(), dp)
            padded = torch.cat([flat, torch.full((part * dp - flat.numel(),), 1e30)])  # garbage padding
            chunks.append(padded[rank * part:(rank + 1) * part])
        groups.append(torch.cat(chunks))
    return groups


def by_name(groups: list[torch.Tensor], dp: int, rank: int, shapes=PARAM_SHAPES) -> dict[str, torch.Tensor]:
    """Each parameter's elements held by `rank` under ZeRO-3, by name."""
    return {name: view for name, (view, _) in views(groups, FlatLayout.zero3(shapes, dp), rank).items()}


def consolidate(shards: list[list[torch.Tensor]], dp: int) -> dict[str, torch.Tensor]:
    parts = [by_name(s, dp, rank) for rank, s in enumerate(shards)]
    return {name: torch.cat([p[name] for p in parts])[: math.prod(shape)].view(shape)
            for group in PARAM_SHAPES for name, shape in group.items()}


def random_model() -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape) for group in PARAM_SHAPES for name, shape in group.items()}


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_the_average_of_shards_is_the_shard_of_the_average(dp):
    models = [random_model() for _ in range(4)]
    per_rank = [[partition(m, dp, r) for m in models] for r in range(dp)]
    averaged_shards = [average_shards(per_rank[r]) for r in range(dp)]
    reference = average_state_dicts(models)
    got = consolidate(averaged_shards, dp)
    for name in reference:
        assert torch.allclose(got[name], reference[name], atol=1e-6), name


def test_zero_padding_clears_exactly_the_tail_past_each_parameter():
    dp = 3
    model = random_model()
    for rank in range(dp):
        groups = partition(model, dp, rank)
        layout = FlatLayout.zero3(PARAM_SHAPES, dp)
        zero_padding(groups, layout, rank)
        assert all(torch.isfinite(g).all() and g.abs().max() < 1e29 for g in groups)
        # the real values survive, and only the tails past each parameter were cleared
        for name, part in by_name(groups, dp, rank).items():
            flat = model[name].flatten()
            size = chunk_numel(flat.numel(), dp)
            assert torch.equal(part, flat[rank * size:(rank + 1) * size])
        for g, start, stop in layout.padding(rank, [t.numel() for t in groups]):
            assert torch.count_nonzero(groups[g][start:stop]) == 0


def model_states(dp: int, step: int = 0) -> dict:
    return {"module": {}, "buffer_names": [], "param_shapes": PARAM_SHAPES, "frozen_param_shapes": None,
            "frozen_param_fragments": None, "shared_params": {}, "dp_world_size": dp, "mp_world_size": 1,
            "ds_version": "0.19.8", "global_steps": step}


def write_slot(root: str, step: int, model: dict, dp: int = 2, commit: bool = True) -> str:
    path = os.path.join(root, step_name(step))
    files = {}
    for rank in range(dp):
        groups = partition(model, dp, rank)
        zero_padding(groups, FlatLayout.zero3(PARAM_SHAPES, dp), rank)
        files.update(slots.write_shard(path, rank, 0, groups, model_states(dp, step)))
    if commit:
        slots.commit(path, slots.SlotManifest(kind="raw", step=step, tokens=step * 10, lr=0.1, dp=dp, tp=1,
                                              param_shapes=zero_checkpoint.shapes_to_json(PARAM_SHAPES), files=files,
                                              ds_version="0.19.8"))
    return path


def test_slot_round_trip_and_commit_marker(tmp_path):
    model = random_model()
    write_slot(str(tmp_path), 4, model)
    write_slot(str(tmp_path), 6, model, commit=False)  # a slot still being written, or torn
    assert slots.committed_steps(str(tmp_path)) == [4]
    groups, manifest = slots.read_shard(str(tmp_path / "step_00000004"), 1, 0)
    assert manifest.step == 4 and manifest.dp == 2
    expected = partition(model, 2, 1)
    zero_padding(expected, FlatLayout.zero3(PARAM_SHAPES, 2), 1)
    assert all(torch.equal(a, b) for a, b in zip(groups, expected))
    with pytest.raises(slots.SlotVanished):
        slots.read_shard(str(tmp_path / "step_00000006"), 0, 0)
    # no temporary files are left behind
    assert not [f for f in os.listdir(tmp_path / "step_00000004") if ".partial-" in f]


def test_a_flipped_byte_is_caught_by_the_checksum(tmp_path):
    path = write_slot(str(tmp_path), 2, random_model())
    victim = os.path.join(path, zero_checkpoint.optim_states_file(0, 0))
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    with pytest.raises(slots.SlotCorrupt, match="checksum"):
        slots.read_shard(path, 0, 0)
    slots.read_shard(path, 1, 0)  # the other rank's file is intact


def test_a_slot_recycled_while_reading_is_reported_as_vanished(tmp_path):
    path = write_slot(str(tmp_path), 2, random_model())
    manifest = slots.read_manifest(path)
    slots.remove_slot(path)  # the trainer recycles it between our manifest read and the data read
    with pytest.raises(slots.SlotVanished):
        slots.read_shard(path, 0, 0, manifest)


def test_slots_of_different_layouts_or_shapes_are_refused(tmp_path):
    a = slots.read_manifest(write_slot(str(tmp_path / "a"), 2, random_model(), dp=2))
    b = slots.read_manifest(write_slot(str(tmp_path / "b"), 4, random_model(), dp=1))
    with pytest.raises(LayoutMismatch, match=r"data 2 × tensor 1, ZeRO-3\) with step 4 \(data 1 × tensor 1"):
        slots.check_compatible([a, b])
    c = dataclasses.replace(a, step=6, param_shapes=[[["w1", [5, 8]], ["w2", [4, 4]]], a.param_shapes[1]])
    with pytest.raises(LayoutMismatch, match=r"w1: \[5, 7\] vs \[5, 8\]"):
        slots.check_compatible([a, c])


def test_layout_walk_handles_deepspeed_sub_groups_and_refuses_wrong_sizes():
    # DeepSpeed may split one parameter group into several flat sub-groups: the same partitions
    # must come out whether param_shapes has one dict per flat group or one for all of them.
    dp, model = 3, random_model()
    per_group = partition(model, dp, 1)
    merged_shapes = [OrderedDict((n, s) for g in PARAM_SHAPES for n, s in g.items())]
    a = by_name(per_group, dp, 1)
    b = by_name(per_group, dp, 1, merged_shapes)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LayoutMismatch):
        by_name([per_group[0][:-1], per_group[1]], dp, 1)
    with pytest.raises(LayoutMismatch):
        zero_padding(per_group, FlatLayout.zero3(PARAM_SHAPES, 2), 0)  # written at dp=3


def test_a_slot_is_committed_once(tmp_path):
    path = write_slot(str(tmp_path), 4, random_model(), dp=2)
    manifest = slots.read_manifest(path)
    with pytest.raises(slots.SlotError, match="already committed"):
        slots.commit(path, manifest)


def test_node_parts_gathered_into_one_folder_read_as_a_whole_slot(tmp_path):
    """On node-local storage each node commits its own ranks' part; copying every node's folder
    into one (rsync, as the one-line message says) gives a slot every tool reads, checksums and all."""
    import shutil

    model, dp = random_model(), 2
    placement = {"node1": [0], "node2": [1]}
    for node, ranks in placement.items():
        path = str(tmp_path / node / step_name(4))
        files = {}
        for rank in ranks:
            groups = partition(model, dp, rank)
            zero_padding(groups, FlatLayout.zero3(PARAM_SHAPES, dp), rank)
            files.update(slots.write_shard(path, rank, 0, groups, model_states(dp, 4)))
        slots.commit(path, slots.SlotManifest(kind="raw", step=4, tokens=40, lr=0.1, dp=dp, tp=1,
                                              param_shapes=zero_checkpoint.shapes_to_json(PARAM_SHAPES),
                                              files=files, node=node, nodes=placement))
    alone = slots.read_manifest(str(tmp_path / "node1" / step_name(4)))
    assert alone.node == "node1" and len(alone.files) == 2  # its own rank's two files
    with pytest.raises(slots.SlotUnusable, match=r"rank 1 on node2\); copy them here"):
        slots.read_shard(str(tmp_path / "node1" / step_name(4)), 1, 0)
    gathered = tmp_path / "gathered" / step_name(4)
    for node in placement:  # node2's manifest.json lands last and overwrites node1's
        shutil.copytree(tmp_path / node / step_name(4), gathered, dirs_exist_ok=True)
    whole = slots.read_manifest(str(gathered))
    assert whole.node is None and len(whole.files) == 4
    for rank in range(dp):
        expected = partition(model, dp, rank)
        zero_padding(expected, FlatLayout.zero3(PARAM_SHAPES, dp), rank)
        got, _ = slots.read_shard(str(gathered), rank, 0, whole)  # checksum-verified
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
