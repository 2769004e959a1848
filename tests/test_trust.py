"""What a reader may trust, single process: no file runs code when read (core.pickles), every file of a
slot, merge or checkpoint is checked against its folder's record (core.integrity), and the snapshot
ring lives in folders no other user can write (core.private_folder)."""
from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace

import pytest
import torch

from averaging import slots
from core import pickles
from core.files import serialize
from core.integrity import ChecksumMismatch, record_of
from core.private_folder import FolderReplaced, NotPrivate, PrivateFolder
from core.records import SEAL, seal_of
from core.zero_checkpoint import RunState, optim_states_file
from core.zero_folder import StateDictSource, ZeroFolder, consolidate


class Plant:
    """Unpickling it creates `marker`: what a planted file would do with os.system instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w": torch.randn(6, 4), "b": torch.randn(5)}


def committed_slot(folder, dp: int = 2) -> str:
    weights = state()
    files = slots.write_weights(str(folder), StateDictSource(weights), dp, 1, {})
    slots.commit(str(folder), slots.SlotManifest(
        kind="raw", step=1, tokens=0, lr=None, dp=dp, tp=1,
        param_shapes=[[[n, list(t.shape)] for n, t in weights.items()]], files=files))
    return str(folder)


def plant(slot: str, name: str, marker: str) -> None:
    """Replace one file of a committed slot, fixing its manifest's checksum as an attacker can (the
    checksums live in the same folder)."""
    payload = {"optimizer_state_dict": {"fp32_flat_groups": [torch.zeros(3)], "zero_stage": 3, "x": Plant(marker)}}
    data = bytes(serialize(payload))
    with open(os.path.join(slot, name), "wb") as f:
        f.write(data)
    manifest_path = os.path.join(slot, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    manifest["files"][name] = record_of(data)
    manifest[SEAL] = seal_of(manifest)  # the seal guards against damage, not against whoever can write the folder
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)




def test_a_planted_slot_file_is_refused_and_runs_nothing(tmp_path, one_process):
    marker = str(tmp_path / "ran")
    slot = committed_slot(tmp_path / "step_00000001")
    plant(slot, optim_states_file(1, 0), marker)

    with pytest.raises(slots.SlotCorrupt, match=r"holds Python objects besides tensors \(io.open\)"):
        slots.read_shard(slot, 1, 0)  # the sidecar's read
    slots.read_shard(slot, 0, 0)  # the other rank's file is fine
    with pytest.raises(pickles.UnsafePickle, match=f"{optim_states_file(1, 0)} holds Python objects"):
        consolidate(slot)  # init_from, growth, export, the consolidate tool
    with pytest.raises(pickles.UnsafePickle):
        deepspeed_reader().load(os.path.join(slot, optim_states_file(1, 0)))  # DeepSpeed's own load_checkpoint
    assert not os.path.exists(marker)

    # What a full unpickle (the old reader's) does with the same file: only where the user trusts it.
    with pickles.trusting(True):
        pickles.load(os.path.join(slot, optim_states_file(1, 0)))
    assert os.path.exists(marker)


@pytest.fixture
def one_process():
    """A process group of this one process (DeepSpeed's checkpoint engine logs through it)."""
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


def deepspeed_reader():
    """DeepSpeed's own checkpoint engine (what engine.load_checkpoint reads through), routed as
    core/engine.py routes every engine's."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    pickles.route_deepspeed_loads(engine)
    return engine.checkpoint_engine


def test_deepspeeds_own_checkpoint_types_load_weights_only(tmp_path, one_process):
    """A DeepSpeed optimizer file holds an enum and loss-scaler records: allowed, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = str(tmp_path / "optim.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum(3), "loss_scaler": LossScaler(1.0),
                                         "dynamic": DynamicLossScaler(init_scale=2.0**16, scale_window=10, min_scale=1,
                                                                       delayed_shift=1, consecutive_hysteresis=False),
                                         "fp32_flat_groups": [torch.ones(2)]}}, path)
    for loaded in (pickles.load(path)["optimizer_state_dict"], deepspeed_reader().load(path)["optimizer_state_dict"]):
        assert loaded["zero_stage"] == 3 and type(loaded["zero_stage"]) is int
        assert type(loaded["loss_scaler"]) is LossScaler and loaded["loss_scaler"].loss_scale == 1.0
        dynamic = loaded["dynamic"]
        assert type(dynamic) is DynamicLossScaler and dynamic.cur_scale == 2.0**16 and dynamic.scale_window == 10
        dynamic.update_scale(overflow=True)  # DeepSpeed's own methods work on what was read
        assert dynamic.cur_scale == 2.0**15
        assert torch.equal(loaded["fp32_flat_groups"][0], torch.ones(2))
        torch.save(loaded, str(tmp_path / "again.pt"))  # DeepSpeed saves what it loaded, as its own types
        assert type(pickles.load(str(tmp_path / "again.pt"))["dynamic"]) is DynamicLossScaler


class Crafted:
    """Pickles as `cls(*args)` followed by `state` applied to the result (pickle's REDUCE, then BUILD)."""

    def __init__(self, cls, args, state):
        self.cls, self.args, self.state = cls, args, state

    def __reduce__(self):
        return (self.cls, self.args, self.state)


def test_a_file_cannot_change_deepspeeds_shared_members(tmp_path, one_process):
    """The unpickler hands back an enum's one shared member: a file's state applied to it would stay on
    it for the rest of the process. The enum reads as a plain int; a record takes plain data fields only."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = str(tmp_path / "crafted.pt")
    torch.save({"zero_stage": Crafted(ZeroStageEnum, (0,), {"planted": "by the file"})}, path)
    with pytest.raises(pickles.PickleError, match=f"cannot read {path}: .*int"):
        pickles.load(path)
    with pytest.raises(pickles.PickleError):
        deepspeed_reader().load(path)
    assert "planted" not in vars(ZeroStageEnum.disabled) and not hasattr(ZeroStageEnum.disabled, "planted")

    for state, why in (({"loss_scale": 5.0}, "not one of its data fields"),  # a property of the class
                       ({"backward": 1}, "not one of its data fields"),  # a method
                       ({"__class__": 1}, "not one of its data fields"),
                       ({"cur_scale": torch.ones(1)}, "cur_scale is a Tensor, not a plain value"),
                       ([1, 2], "state is a list")):
        torch.save({"loss_scaler": Crafted(LossScaler, (1.0,), state)}, path)
        with pytest.raises(pickles.PickleError, match=why):
            pickles.load(path)
    assert LossScaler(1.0).loss_scale == 1.0 and not hasattr(LossScaler, "planted")


def test_trust_in_one_thread_is_not_trust_in_another(tmp_path, one_process):
    """Whether a load may run code is the caller's own (a context variable), never a process-wide switch:
    a thread that trusts its source while others read planted files lets none of them through."""
    marker = str(tmp_path / "ran")
    slot = committed_slot(tmp_path / "step_00000001")
    plant(slot, optim_states_file(1, 0), marker)
    planted, fine = os.path.join(slot, optim_states_file(1, 0)), os.path.join(slot, optim_states_file(0, 0))
    reader, refused, errors = deepspeed_reader(), [], []

    def untrusting():
        for _ in range(20):
            try:
                reader.load(planted)
            except pickles.UnsafePickle:
                refused.append(1)
            except Exception as e:  # noqa: BLE001 (anything else fails the test below)
                errors.append(e)

    def trusting():
        for _ in range(20):
            with pickles.trusting(True):
                reader.load(fine)

    threads = [threading.Thread(target=untrusting) for _ in range(2)] + [threading.Thread(target=trusting)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(refused) == 40 and not os.path.exists(marker)


def test_a_flipped_byte_anywhere_is_one_line_naming_the_file(tmp_path):
    """Every reader of a slot or checkpoint folder verifies what it maps (before: ZeroFolder took a
    flipped byte silently, changing the weights)."""
    slot = committed_slot(tmp_path / "slot")
    assert set(consolidate(slot)) == {"w", "b"}
    victim = os.path.join(slot, optim_states_file(0, 0))
    data = bytearray(open(victim, "rb").read())
    data[-300] ^= 0x01  # inside the tensor bytes: the pickle still loads
    open(victim, "wb").write(bytes(data))
    with pytest.raises(ChecksumMismatch) as info:
        consolidate(slot)
    assert str(info.value).startswith(victim) and "\n" not in str(info.value)

    # A checkpoint folder: run_state.json's records.
    ckpt = tmp_path / "step_00000002"
    weights = state()
    files = slots.write_weights(str(ckpt), StateDictSource(weights), 2, 1, {})
    RunState(step=2, tokens=0, dp=2, tp=1, files=files).write(str(ckpt))
    assert torch.equal(ZeroFolder(str(ckpt)).tensor("w"), weights["w"])
    os.truncate(ckpt / optim_states_file(1, 0), 100)
    with pytest.raises(ChecksumMismatch, match=f"{optim_states_file(1, 0)} is 100 bytes, its record says"):
        consolidate(str(ckpt))


def test_the_ring_folder_is_private_or_refused(tmp_path):
    ring = tmp_path / "ring"
    PrivateFolder(str(ring)).close()
    assert oct(ring.stat().st_mode & 0o777) == "0o700"
    ring.chmod(0o755)  # ours, readable by others: made private, through the open descriptor
    PrivateFolder(str(ring)).close()
    assert oct(ring.stat().st_mode & 0o777) == "0o700"
    ring.chmod(0o770)
    with pytest.raises(NotPrivate, match=rf"{ring} can be written by its group \(mode 770\).*remove it, or choose"):
        PrivateFolder(str(ring))
    ring.chmod(0o700)
    link = tmp_path / "link"
    link.symlink_to(ring)
    with pytest.raises(NotPrivate, match="is a link"):
        PrivateFolder(str(link))
    with pytest.raises(FileNotFoundError):
        PrivateFolder(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()
    # Inside: a mark is made here and now, never written through a link; a walk refuses links.
    precious = tmp_path / "precious"
    precious.write_text("kept")
    (ring / ".node-a").symlink_to(precious)
    folder = PrivateFolder(str(ring))
    with pytest.raises(FileExistsError):
        folder.create_mark(".node-a")
    with pytest.raises(NotPrivate, match=rf"{ring} holds a link, {ring}/.node-a"):
        list(folder.walk())
    assert precious.read_text() == "kept"
    (ring / ".node-a").unlink()
    folder.create_mark(".node-a")
    assert [e.name for e in folder.walk()] == [".node-a"]
    folder.remove_mark(".node-a")
    # Re-checked: the same path, another folder.
    ring.rename(tmp_path / "away")
    ring.mkdir(mode=0o700)
    with pytest.raises(FolderReplaced, match=rf"{ring} is no longer the folder this run opened"):
        folder.check()
    folder.close()
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)  # a folder anyone may write, not sticky: nothing under it is private
    with pytest.raises(NotPrivate, match=rf"lies under {tmp_path / 'open'}, which anyone can write \(mode 777\)"):
        PrivateFolder(str(tmp_path / "open" / "ring"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user (chown)")
def test_a_ring_folder_of_another_user_is_refused_naming_its_owner(tmp_path):
    ring = tmp_path / "theirs"
    ring.mkdir(mode=0o700)
    os.chown(ring, 65534, 65534)
    with pytest.raises(NotPrivate, match=rf"{ring} belongs to nobody, not to root: .*remove it, or choose"):
        PrivateFolder(str(ring))
