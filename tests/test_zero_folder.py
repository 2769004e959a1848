"""Streamed whole-model paths give the tensors of the whole-model ones: ZeRO-3 folders read tensor
by tensor (and one rank's cut at a time) equal DeepSpeed's zero_to_fp32 and the full state dict cut
by hand; growth as a lazy view equals growing the state dict; safetensors written tensor by tensor,
sharded with an index, read back exactly (and load in transformers); mapped pages are given back."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

from averaging import slots
from core.flat_layout import FlatLayout
from core.weights import SAFETENSORS_INDEX, Weights, write_safetensors
from core.zero_folder import Cut, StateDictSource, ZeroFolder, consolidate, fill_flat_groups, release_pages
from models.growth import Grown, grow
from models.hf import export
from models.registry import build_model, model_config

# Sizes chosen so that numel % dp leaves padding at dp 3 and 4 (the vocabulary splits over 2 ranks).
CONFIG = model_config("micro", vocab_size=102, block_size=23)


def tp_layout(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Megatron's splits for our GPT blocks: column-parallel qkv (3 fused blocks) and up, row-parallel
    proj and down, the embedding by vocabulary rows."""
    layout = {"wte.weight": [0, 1]}
    for name in state:
        if name.endswith("attn.qkv.weight"):
            layout[name] = [0, 3]
        elif name.endswith("mlp.up.weight"):
            layout[name] = [0, 1]
        elif name.endswith(("attn.proj.weight", "mlp.down.weight")):
            layout[name] = [1, 1]
    return layout


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def groups_of(state) -> list[list[str]]:
    """Two flat groups, as DeepSpeed's decay / no-decay parameter groups."""
    return [[n for n in state if state[n].dim() == 2], [n for n in state if state[n].dim() < 2]]


def write_folder(folder, state, dp, tp, stage: int = 3) -> str:
    slots.write_weights(str(folder), StateDictSource(state), dp, tp, tp_layout(state) if tp > 1 else {},
                        groups_of(state), stage=stage)
    return str(folder)


@pytest.mark.parametrize("dp, tp, stage", [(1, 1, 3), (3, 1, 3), (2, 2, 3), (1, 2, 3), (3, 1, 2), (2, 2, 1), (4, 1, 2)])
def test_a_folder_consolidates_to_the_state_dict_it_was_cut_from(state, tmp_path, dp, tp, stage):
    got = consolidate(write_folder(tmp_path / "f", state, dp, tp, stage))
    assert set(got) == set(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("stage", [3, 2])
def test_consolidation_equals_deepspeeds_zero_to_fp32(state, tmp_path, stage):
    """Our files of each stage are DeepSpeed's: its zero_to_fp32 reads them, to the same tensors."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = write_folder(tmp_path / "step_00000001", state, 3, 1, stage)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="step_00000001")
    got = consolidate(folder)
    assert list(got) == list(reference)
    assert all(torch.equal(got[k], reference[k]) for k in reference)


@pytest.mark.parametrize("source_dp, source_tp, source_stage", [(3, 1, 3), (2, 2, 3), (3, 1, 2), (2, 2, 1)])
def test_each_ranks_flat_groups_are_its_cut_of_the_full_weights(state, tmp_path, source_dp, source_tp, source_stage):
    """What a rank loads (init_from, growth) from a folder of any layout and stage into any other:
    read through the folder's own partitions, the same flat groups as cut from the full tensors."""
    source = ZeroFolder(write_folder(tmp_path / "f", state, source_dp, source_tp, source_stage))
    full, splits = StateDictSource(state), tp_layout(state)
    for dp in (1, 2, 4):
        for tp in (1, 2):
            for stage in (3, 2):
                for dp_rank in range(dp):
                    for tp_rank in range(tp):
                        shapes = [{n: source.slice_shapes[n] if tp == source_tp else
                                   torch.Size(tp_slice_shape(state[n], splits.get(n), tp)) for n in group}
                                  for group in groups_of(state)]
                        layout = FlatLayout.zero3(shapes, dp) if stage == 3 else FlatLayout.zero12(stage, shapes, dp)
                        cut = Cut(dp_rank, dp, tp_rank, tp)
                        got = fill_flat_groups(source, layout, cut, splits)
                        want = fill_flat_groups(full, layout, cut, splits)
                        assert all(torch.equal(a, b) for a, b in zip(got, want)), (dp, tp, stage, cut)


def tp_slice_shape(tensor: torch.Tensor, split, tp: int) -> list[int]:
    shape = list(tensor.shape)
    if split is not None and tp > 1:
        shape[split[0]] //= tp
    return shape


def test_an_unreadable_file_is_named_in_one_line(state, tmp_path):
    folder = write_folder(tmp_path / "f", state, 2, 1)
    os.truncate(os.path.join(folder, slots.optim_states_file(1, 0)), 100)
    with pytest.raises(ValueError, match=r"cannot read .*zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        consolidate(folder)


def test_growth_as_a_view_equals_growing_the_state_dict(state, tmp_path):
    grown_state, grown_config = grow(state, CONFIG, 3, "interpolate")
    view = Grown(ZeroFolder(write_folder(tmp_path / "f", state, 2, 1)), CONFIG, 3, "interpolate")
    assert view.config == grown_config and set(view.names()) == set(grown_state)
    for name, full in grown_state.items():
        assert tuple(view.shape(name)) == tuple(full.shape)
        assert torch.equal(view.flat_range(name, None, 0, 1, 3, 11), full.reshape(-1)[3:11])


def test_safetensors_are_written_tensor_by_tensor_into_indexed_shards(state, tmp_path):
    from safetensors.torch import load_file

    largest = max(t.numel() * 4 for t in state.values())
    files = write_safetensors(StateDictSource(state), str(tmp_path), torch.float32, max_shard_bytes=largest // 2)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
    assert set(index["weight_map"]) == set(state) and sorted(set(index["weight_map"].values())) == files
    for file in files:  # every shard within the limit, unless it holds one tensor bigger than the limit
        tensors = load_file(str(tmp_path / file))
        assert sum(t.numel() * 4 for t in tensors.values()) <= largest // 2 or len(tensors) == 1
        assert all(torch.equal(t, state[name]) for name, t in tensors.items())
    weights = Weights.of_hf_folder(str(tmp_path))  # our own lazy reader follows the index
    assert all(torch.equal(weights.rows(name), state[name]) for name in state)
    single = tmp_path / "single"
    single.mkdir()
    assert write_safetensors(StateDictSource(state), str(single), torch.bfloat16) == ["model.safetensors"]
    assert not (single / SAFETENSORS_INDEX).exists()
    assert all(torch.equal(t, state[n].bfloat16()) for n, t in load_file(str(single / "model.safetensors")).items())


def test_a_folder_exports_streamed_into_shards_that_transformers_loads(state, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(CONFIG).eval()
    model.load_state_dict(state)
    out = tmp_path / "hf"
    export(ZeroFolder(write_folder(tmp_path / "f", state, 2, 2)), CONFIG, str(out), max_shard_bytes=20_000)
    assert (out / SAFETENSORS_INDEX).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    hf = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        assert (ours - hf(idx).logits).abs().max().item() <= 1e-4


def resident_file_kb() -> int:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssFile"].split()[0]) + int(fields["RssShmem"].split()[0])


def test_released_pages_leave_the_process_and_read_back_the_same(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"x": torch.arange(16 * 2**20, dtype=torch.float32)}, path)  # 64 MiB
    mapped = torch.load(path, mmap=True)["x"]
    before = resident_file_kb()
    total = mapped.sum().item()  # touches every page
    touched = resident_file_kb()
    release_pages(mapped)
    released = resident_file_kb()
    assert touched - before > 60 * 1024 and touched - released > 60 * 1024
    assert mapped.sum().item() == total  # the file is read again


def test_a_slot_is_read_mapped_and_verified(state, tmp_path):
    folder = tmp_path / "step_00000001"
    files = slots.write_weights(str(folder), StateDictSource(state), 2, 1, {})
    manifest = slots.SlotManifest(kind="raw", step=1, tokens=0, lr=None, dp=2, tp=1,
                                  param_shapes=[[[n, list(t.shape)] for n, t in state.items()]], files=files)
    slots.commit(str(folder), manifest)
    flat, _ = slots.read_shard(str(folder), 1, 0)
    layout = FlatLayout.zero3([{n: t.shape for n, t in state.items()}], 2)
    want = fill_flat_groups(StateDictSource(state), layout, Cut(1, 2), {})[0]
    assert torch.equal(flat[0], want)
    name = slots.optim_states_file(1, 0)
    data = bytearray((folder / name).read_bytes())
    data[-200] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(slots.SlotCorrupt, match="does not match its checksum"):
        slots.read_shard(str(folder), 1, 0)
    os.truncate(folder / name, 10)
    with pytest.raises(slots.SlotCorrupt):
        slots.read_shard(str(folder), 1, 0)
