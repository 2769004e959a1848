"""What a reader may trust, single process: no file runs code when read (core.pickles), every file of a
slot, merge or checkpoint is checked against its folder's record (core.integrity), and the snapshot
ring lives in folders no other user can write (core.files.private_folder)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from averaging import slots
from core import pickles
from core.files import NotPrivate, private_folder, serialize
from core.integrity import ChecksumMismatch, record_of
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
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)




def test_a_planted_slot_file_is_refused_and_runs_nothing(tmp_path):
    marker = str(tmp_path / "ran")
    slot = committed_slot(tmp_path / "step_00000001")
    plant(slot, optim_states_file(1, 0), marker)

    with pytest.raises(slots.SlotCorrupt, match=r"holds Python objects besides tensors \(io.open\)"):
        slots.read_shard(slot, 1, 0)  # the sidecar's read
    slots.read_shard(slot, 0, 0)  # the other rank's file is fine
    with pytest.raises(pickles.UnsafePickle, match=f"{optim_states_file(1, 0)} holds Python objects"):
        consolidate(slot)  # init_from, growth, export, the consolidate tool
    with pytest.raises(pickles.UnsafePickle):
        with pickles.deepspeed_loads(slot):  # DeepSpeed's own torch.load(weights_only=False) calls
            torch.load(os.path.join(slot, optim_states_file(1, 0)), weights_only=False)
    assert not os.path.exists(marker)

    # What a full unpickle (the old reader's) does with the same file: only where the user trusts it.
    with pickles.trusting(True):
        pickles.load(os.path.join(slot, optim_states_file(1, 0)))
    assert os.path.exists(marker)


def test_deepspeeds_own_checkpoint_types_load_weights_only(tmp_path):
    """A DeepSpeed optimizer file holds an enum and loss-scaler records: allowed, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = str(tmp_path / "optim.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum(3), "loss_scaler": LossScaler(1.0),
                                         "fp32_flat_groups": [torch.ones(2)]}}, path)
    loaded = pickles.load(path)["optimizer_state_dict"]
    assert loaded["zero_stage"] == ZeroStageEnum(3) and loaded["loss_scaler"].cur_scale == 1.0
    assert torch.equal(loaded["fp32_flat_groups"][0], torch.ones(2))


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
    private_folder(str(ring))
    assert oct(ring.stat().st_mode & 0o777) == "0o700"
    ring.chmod(0o755)  # ours, readable by others: made private
    private_folder(str(ring))
    assert oct(ring.stat().st_mode & 0o777) == "0o700"
    ring.chmod(0o770)
    with pytest.raises(NotPrivate, match=rf"{ring} \(owner .*\) can be written by its group \(mode 770\)"):
        private_folder(str(ring))
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(NotPrivate, match="is a link"):
        private_folder(str(link))
    private_folder(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a folder to another user (chown)")
def test_a_ring_folder_of_another_user_is_refused_naming_its_owner(tmp_path):
    ring = tmp_path / "theirs"
    ring.mkdir(mode=0o700)
    os.chown(ring, 65534, 65534)
    with pytest.raises(NotPrivate, match=rf"{ring} belongs to nobody, not to root: refusing"):
        private_folder(str(ring))
