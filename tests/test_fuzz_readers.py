"""Property-based tests (Hypothesis) of the readers of what the ring and the checkpoints hand over:
slot manifests, slot files, checkpoint run states and buddy copies' manifests. Whatever bytes a crash,
a disk or another program leaves there, each reader either refuses them with the one-line error of
its layer (SlotError for the sidecar and restarts, RecordError for checkpoint records, a problem
line from checkpoint verification) or reads back exactly what was written; none crashes its
process, none accepts a record it cannot use."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from averaging import slots
from core.files import serialize
from core.integrity import record_of
from core.records import LARGEST, SEAL, RecordError, seal_of
from core.run_dir import MANIFEST, RUN_STATE
from core.zero_checkpoint import MAX_RANKS, RunState, optim_states_file
from core.zero_folder import StateDictSource
from launcher import buddy, checkpoint

# Hypothesis keeps caches beside the examples: in the temporary folder, not the checkout.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "lawa-hypothesis"))
FUZZ = settings(max_examples=200, deadline=None, database=None,  # no example store left in the checkout
                suppress_health_check=[HealthCheck.function_scoped_fixture])
DP = 2


def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(6, 4), "b": torch.randn(5)}


def shapes_json(state: dict[str, torch.Tensor]) -> list:
    return [[[name, list(t.shape)] for name, t in state.items()]]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A committed slot, a buddy copy of one node's part of a restart slot, and a checkpoint folder
    with its run state, written once; each example works on a copy."""
    root = tmp_path_factory.mktemp("originals")
    state = weights()
    slot = root / "ring" / "step_00000010"
    files = slots.write_weights(str(slot), StateDictSource(state), DP, 1, {})
    slots.commit(str(slot), slots.SlotManifest(kind="raw", step=10, tokens=640, lr=1e-3, dp=DP, tp=1,
                                               param_shapes=shapes_json(state), files=files, run="r1"))
    copy = slots.buddy_path(str(root / "ring"), "nodeA", 10)
    part = {name: record for name, record in files.items() if name.startswith("zero_pp_rank_0_")}
    os.makedirs(copy)
    for name in part:
        shutil.copy(slot / name, os.path.join(copy, name))
    slots.commit(copy, slots.SlotManifest(kind="raw", step=10, tokens=640, lr=1e-3, dp=DP, tp=1,
                                          param_shapes=shapes_json(state), files=part, run="r1",
                                          node="nodeA", nodes={"nodeA": [0], "nodeB": [1]}))
    ckpt = root / "checkpoints" / "step_00000010"
    RunState(step=10, tokens=640, dp=DP, tp=1, files=slots.write_weights(str(ckpt), StateDictSource(state), DP, 1, {})
             ).write(str(ckpt))
    return SimpleNamespace(ring=str(root / "ring"), slot=str(slot), copy=copy, ckpt=str(ckpt))


@pytest.fixture(scope="module")
def one_process():
    """A process group of this one process: checkpoint verification gathers every rank's verdict."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield SimpleNamespace(is_main=True, world_size=1, rank=0, ctrl_group=None)
    dist.destroy_process_group()


class Scratch:
    """A fresh copy of one of the originals' folders, removed afterwards."""

    def __init__(self, source: str):
        self.top = tempfile.mkdtemp(prefix="fuzz-")
        self.path = os.path.join(self.top, os.path.basename(source))
        shutil.copytree(source, self.path)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.top)


# ---------------------------------------------------------------------------------------------
# what is done to the bytes


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` truncated, or with one to four of its bytes changed."""
    if draw(st.booleans()):
        return data[:draw(st.integers(0, len(data) - 1))]
    out = bytearray(data)
    for i in draw(st.lists(st.integers(0, len(out) - 1), min_size=1, max_size=4, unique=True)):
        out[i] ^= draw(st.integers(1, 255))
    return bytes(out)


BAD_NAMES = st.sampled_from(["..", "../x", "/etc/passwd", "a/../../b", "a\\b", "", ".", "x/", "a\0b", "./y"])
HUGE_OR_NEGATIVE = st.one_of(st.integers(max_value=-1), st.integers(min_value=LARGEST),
                             st.integers(min_value=10**30, max_value=10**40))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def rewrite_sealed(path: str, change) -> None:
    """Change a record's parsed content and seal it again, as a program writing plausible JSON would:
    what the seal cannot catch, the reader's field checks must."""
    data = json.loads(open(path).read())
    change(data)
    data[SEAL] = seal_of(data)
    with open(path, "w") as f:
        json.dump(data, f)


def one_line(e: BaseException, names: str) -> None:
    message = str(e)
    assert message and "\n" not in message, message
    assert names in message, message


def without_seal(data: dict) -> dict:
    return {key: value for key, value in data.items() if key != SEAL}


# ---------------------------------------------------------------------------------------------
# slot manifests (the sidecar's and a restart's first read)


@FUZZ
@given(st.data())
def test_a_damaged_slot_manifest_is_refused_or_reads_as_written(originals, data):
    original = open(os.path.join(originals.slot, MANIFEST), "rb").read()
    written = slots.read_manifest(originals.slot)
    bad = data.draw(damaged(original))
    with Scratch(originals.slot) as slot:
        open(os.path.join(slot, MANIFEST), "wb").write(bad)
        try:
            manifest = slots.read_manifest(slot)
        except slots.SlotCorrupt as e:
            one_line(e, slot)
            return
        assert manifest == written  # only a change the JSON does not see (whitespace) is read


MANIFEST_FIELDS = [name for name in slots.SlotManifest.__dataclass_fields__]


@FUZZ
@given(field=st.sampled_from(MANIFEST_FIELDS), value=JSON_VALUES)
def test_a_slot_manifest_of_any_content_is_refused_or_safe_to_read(originals, field, value):
    """Plausible JSON with any value in any field (sealed again, as a program would write it): refused
    in one line naming the file, or a manifest whose shards read as the layout says or are refused."""
    with Scratch(originals.slot) as slot:
        rewrite_sealed(os.path.join(slot, MANIFEST), lambda d: d.__setitem__(field, value))
        try:
            manifest = slots.read_manifest(slot)
        except slots.SlotCorrupt as e:
            one_line(e, MANIFEST)
            return
        for rank in range(DP):
            try:
                flat, _ = slots.read_shard(slot, rank, 0, manifest)
            except slots.SlotError as e:
                one_line(e, slot)
                continue
            assert all(t.dtype == torch.float32 and t.dim() == 1 for t in flat)


@FUZZ
@given(field=st.sampled_from(["step", "tokens", "dp", "tp", "zero_stage"]), number=HUGE_OR_NEGATIVE)
def test_huge_or_negative_numbers_in_a_manifest_are_refused(originals, field, number):
    with Scratch(originals.slot) as slot:
        rewrite_sealed(os.path.join(slot, MANIFEST), lambda d: d.__setitem__(field, number))
        with pytest.raises(slots.SlotCorrupt) as info:
            slots.read_manifest(slot)
        one_line(info.value, MANIFEST)


@FUZZ
@given(name=BAD_NAMES, where=st.sampled_from(["files", "nodes", "node"]))
def test_names_outside_the_folder_are_refused(originals, name, where):
    def change(d):
        if where == "files":
            d["files"][name] = next(iter(d["files"].values()))
        elif where == "nodes":
            d["nodes"] = {name: [0]}
        else:
            d["nodes"], d["node"] = {name: [0], "b": [1]}, name

    with Scratch(originals.slot) as slot:
        rewrite_sealed(os.path.join(slot, MANIFEST), change)
        with pytest.raises(slots.SlotCorrupt) as info:
            slots.read_manifest(slot)
        one_line(info.value, MANIFEST)


def test_a_record_whose_seal_was_renamed_is_not_read_unsealed(originals):
    """Without its seal a record would be read as one from before seals: a damaged seal's name is
    an unknown key, refused."""
    with Scratch(originals.slot) as slot:
        path = os.path.join(slot, MANIFEST)
        text = open(path).read().replace(f'"{SEAL}"', f'"{SEAL[:-1]}4"').replace('"step": 10', '"step": 11')
        open(path, "w").write(text)
        with pytest.raises(slots.SlotCorrupt, match=f"has '{SEAL[:-1]}4', not a field of a SlotManifest"):
            slots.read_manifest(slot)


# ---------------------------------------------------------------------------------------------
# slot files


@FUZZ
@given(st.data())
def test_a_damaged_slot_file_is_refused_by_its_record(originals, data):
    name = optim_states_file(1, 0)
    bad = data.draw(damaged(open(os.path.join(originals.slot, name), "rb").read()))
    with Scratch(originals.slot) as slot:
        open(os.path.join(slot, name), "wb").write(bad)
        with pytest.raises(slots.SlotCorrupt) as info:
            slots.read_shard(slot, 1, 0)
        one_line(info.value, name)


@FUZZ
@given(st.data())
def test_a_damaged_slot_file_with_a_forged_record_never_crashes_the_reader(originals, data):
    """Damage that its writer re-recorded (as whoever can write the folder could): the weights-only
    reader refuses it as a SlotError, or it reads as flat groups the layout accepts."""
    name = optim_states_file(1, 0)
    bad = data.draw(damaged(open(os.path.join(originals.slot, name), "rb").read()))
    with Scratch(originals.slot) as slot:
        open(os.path.join(slot, name), "wb").write(bad)
        rewrite_sealed(os.path.join(slot, MANIFEST), lambda d: d["files"].__setitem__(name, record_of(bad)))
        try:
            flat, manifest = slots.read_shard(slot, 1, 0)
        except slots.SlotError as e:
            one_line(e, slot)
            return
        assert [t.numel() for t in flat] == manifest.layout().stored_lengths(1)


@pytest.mark.parametrize("groups", [
    [torch.zeros(9, dtype=torch.float64)],  # not fp32
    [torch.zeros(3, 3)],  # not flat
    [torch.zeros(7)],  # not the layout's length
    [torch.zeros(9), torch.zeros(1)],  # more groups than the layout has
    ["nine"],  # not a tensor
])
def test_flat_groups_the_layout_does_not_place_are_refused(originals, groups):
    """A file that unpickles weights-only but does not hold what its manifest's layout says: the sidecar
    would add it up with others, a restart would copy it into the model."""
    name = optim_states_file(1, 0)
    payload = bytes(serialize({"optimizer_state_dict": {"zero_stage": 3, "fp32_flat_groups": groups}}))
    with Scratch(originals.slot) as slot:
        open(os.path.join(slot, name), "wb").write(payload)
        rewrite_sealed(os.path.join(slot, MANIFEST), lambda d: d["files"].__setitem__(name, record_of(payload)))
        with pytest.raises(slots.SlotCorrupt) as info:
            slots.read_shard(slot, 1, 0)
        one_line(info.value, name)


# ---------------------------------------------------------------------------------------------
# checkpoint records


@FUZZ
@given(st.data())
def test_a_damaged_run_state_is_refused_or_reads_as_written(originals, one_process, data):
    path = os.path.join(originals.ckpt, RUN_STATE)
    written = RunState.read(originals.ckpt)
    bad = data.draw(damaged(open(path, "rb").read()))
    with Scratch(originals.ckpt) as ckpt:
        open(os.path.join(ckpt, RUN_STATE), "wb").write(bad)
        try:
            state = RunState.read(ckpt)
        except RecordError as e:
            one_line(e, RUN_STATE)
            problem = checkpoint.verify(ckpt, one_process)  # a resume's verdict on the same folder
            assert problem is not None
            one_line(problem, ckpt)
            return
        assert state == written


RUN_STATE_FIELDS = [name for name in RunState.__dataclass_fields__]


@FUZZ
@given(field=st.sampled_from(RUN_STATE_FIELDS), value=JSON_VALUES)
def test_a_run_state_of_any_content_is_refused_or_verifies_its_files(originals, one_process, field, value):
    with Scratch(originals.ckpt) as ckpt:
        rewrite_sealed(os.path.join(ckpt, RUN_STATE), lambda d: d.__setitem__(field, value))
        problem = checkpoint.verify(ckpt, one_process)
        if problem is not None:
            one_line(problem, ckpt)
        try:
            state = RunState.read(ckpt)
        except RecordError as e:
            one_line(e, RUN_STATE)
            assert problem is not None  # what cannot be read does not verify
        else:
            assert 1 <= state.dp * state.tp <= MAX_RANKS and state.step >= 0


@FUZZ
@given(name=BAD_NAMES, size=st.one_of(st.integers(0, 10**6), HUGE_OR_NEGATIVE))
def test_run_state_file_records_outside_the_folder_or_out_of_range_are_refused(originals, name, size):
    with Scratch(originals.ckpt) as ckpt:
        rewrite_sealed(os.path.join(ckpt, RUN_STATE),
                       lambda d: d["files"].__setitem__(name, {"bytes": size, "xxh3": "0" * 16}))
        with pytest.raises(RecordError) as info:
            RunState.read(ckpt)
        one_line(info.value, RUN_STATE)


# ---------------------------------------------------------------------------------------------
# buddy copies' manifests (what a restart after a node loss asks every node for)


@FUZZ
@given(st.data())
def test_a_damaged_buddy_manifest_is_left_out_never_raised(originals, data):
    bad = data.draw(damaged(open(os.path.join(originals.copy, MANIFEST), "rb").read()))
    fits = lambda manifest: manifest.run == "r1"  # noqa: E731 (what a restart asks of a copy)
    assert buddy.buddy_holdings(originals.ring, 0, fits) == [(10, [0], "nodeA")]
    with Scratch(originals.ring) as ring:
        open(os.path.join(slots.buddy_path(ring, "nodeA", 10), MANIFEST), "wb").write(bad)
        held = buddy.buddy_holdings(ring, 0, fits)
        assert held in ([], [(10, [0], "nodeA")])
        if held:
            assert without_seal(json.loads(bad)) == without_seal(json.loads(
                open(os.path.join(originals.copy, MANIFEST), "rb").read()))


@FUZZ
@given(field=st.sampled_from(MANIFEST_FIELDS), value=JSON_VALUES)
def test_a_buddy_manifest_of_any_content_never_raises(originals, field, value):
    with Scratch(originals.ring) as ring:
        rewrite_sealed(os.path.join(slots.buddy_path(ring, "nodeA", 10), MANIFEST),
                       lambda d: d.__setitem__(field, value))
        for _step, ranks, node in buddy.buddy_holdings(ring, 0, lambda manifest: True):
            assert node == "nodeA" and all(0 <= r < MAX_RANKS for r in ranks)
