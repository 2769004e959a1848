"""Offline averaging (`python -m averaging.average`): every input kind against an independent reference.

References are computed the way a user would check by hand: consolidate each input with DeepSpeed's
own zero_to_fp32 (or load it with transformers / safetensors / torch) and take the mean.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from averaging import offline, slots
from averaging.offline import common as offline_common
from conftest import REPO, launcher_env
from core import zero_checkpoint
from core.files import any_step_of, step_name
from core.flat_layout import FlatLayout, zero_padding


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = offline.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def consolidate(tag_dir) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(tag_dir)
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def mean_of(state_dicts: list[dict]) -> dict[str, torch.Tensor]:
    return {k: sum(sd[k].double() for sd in state_dicts) / len(state_dicts) for k in state_dicts[0]}


def max_diff(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


# ---------------------------------------------------------------------------------------------
# our slots

SHAPES = [OrderedDict([("a.weight", torch.Size([5, 3])), ("a.bias", torch.Size([7]))]),
          OrderedDict([("b.weight", torch.Size([3]))])]


def padding_mask(shapes, dp_rank: int, dp: int) -> list[torch.Tensor]:
    """True where rank dp_rank's flat groups hold padding."""
    layout = FlatLayout.zero3(shapes, dp)
    ones = [torch.ones(n) for n in layout.stored_lengths(dp_rank)]
    zero_padding(ones, layout, dp_rank)
    return [t == 0 for t in ones]


def make_slot(root, step: int, dp: int = 2, shapes=SHAPES, commit: bool = True) -> str:
    """A slot as DeepSpeed would leave it raw: random weights, padding full of huge garbage."""
    gen = torch.Generator().manual_seed(step)
    path = os.path.join(root, step_name(step))
    files = {}
    for rank in range(dp):
        groups = []
        for mask in padding_mask(shapes, rank, dp):
            flat = torch.randn(mask.numel(), generator=gen)
            flat[mask] = 1e30
            groups.append(flat)
        model_states = {"module": {}, "buffer_names": [], "param_shapes": shapes, "shared_params": {},
                        "frozen_param_shapes": None, "dp_world_size": dp, "mp_world_size": 1,
                        "ds_version": "0.19.8", "global_steps": step}
        files.update(slots.write_shard(path, rank, 0, groups, model_states))
    if commit:
        slots.commit(path, slots.SlotManifest(kind="raw", step=step, tokens=step * 1000, lr=1e-3 / step, dp=dp,
                                              tp=1, param_shapes=zero_checkpoint.shapes_to_json(shapes), files=files,
                                              ds_version="0.19.8"))
    return path


def test_slots_average_consolidates_to_the_mean(tmp_path, capsys):
    inputs = [make_slot(tmp_path / "snapshots", step) for step in (200, 300, 100)]  # any order
    out = tmp_path / "offline" / step_name(300)
    code, stdout, err = cli(capsys, "--out", out, *inputs)
    assert code == 0, err
    assert f"wrote {out}" in stdout.splitlines()[-1]

    want = mean_of([consolidate(p) for p in inputs])
    assert max_diff(consolidate(out), want) <= 1e-6

    manifest = slots.read_manifest(str(out))  # committed, and every file matches its checksum
    assert (manifest.kind, manifest.step, manifest.tokens) == ("offline", 300, 300_000)
    assert manifest.steps_averaged == [300, 200, 100] and manifest.dp == 2
    padded = 0
    for rank in range(2):
        groups, _ = slots.read_shard(str(out), rank, 0, manifest)
        for flat, mask in zip(groups, padding_mask(SHAPES, rank, 2)):
            assert torch.all(flat[mask] == 0)
            padded += int(mask.sum())
    assert padded == 3  # 15, 7 and 3 elements over 2 ranks: one padding element each
    assert not [p for p in os.listdir(out.parent) if p.startswith(".")]  # no temporary left


def test_slots_refuses_other_shapes_and_corruption(tmp_path, capsys):
    good = [make_slot(tmp_path / "a", step) for step in (100, 200)]
    shapes = [OrderedDict([("a.weight", torch.Size([5, 3])), ("a.bias", torch.Size([8]))]), SHAPES[1]]
    other = make_slot(tmp_path / "b", 300, shapes=shapes)
    code, _, err = cli(capsys, "--out", tmp_path / "out1", good[0], other)
    assert code == 2 and "a.bias" in err and len(err.strip().splitlines()) == 1

    corrupt = shutil.copytree(good[1], tmp_path / "c" / step_name(200))
    victim = corrupt / zero_checkpoint.optim_states_file(1, 0)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    code, _, err = cli(capsys, "--out", tmp_path / "out2", good[0], corrupt)
    assert code == 2 and "checksum" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_from_dir_picks_spaced_committed_steps(tmp_path, capsys):
    for step in range(100, 900, 100):
        make_slot(tmp_path / "snapshots", step, dp=1, commit=step != 700)  # 700 was torn by a crash
    out = tmp_path / "avg"
    code, stdout, err = cli(capsys, "--out", out, "--from-dir", tmp_path / "snapshots", "--k", 3, "--spacing", 200)
    assert code == 0, err
    assert "chose steps [800, 600, 400]" in stdout
    assert slots.read_manifest(str(out)).steps_averaged == [800, 600, 400]

    code, stdout, _ = cli(capsys, "--out", tmp_path / "avg2", "--from-dir", tmp_path / "snapshots", "--k", 2)
    assert code == 0 and "chose steps [800, 600]" in stdout  # 700 is not committed


@pytest.mark.parametrize("weights", ["linear", "1-sqrt"])
def test_weighted_merges_over_a_token_window_are_the_sidecars(tmp_path, capsys, weights):
    """--window-tokens and --weights pick and weigh slots as a merge of lawa.merges does: the snapshots
    within the window, each weighted like the decay; consolidated, the output is that weighted mean."""
    from averaging.lawa import Merge

    for step in range(100, 1100, 100):
        make_slot(tmp_path / "snapshots", step, dp=2)
    out = tmp_path / "merged"
    code, stdout, err = cli(capsys, "--out", out, "--from-dir", tmp_path / "snapshots", "--window-tokens", 400_000,
                            "--spacing", 200, "--weights", weights)
    assert code == 0, err
    merge = Merge(name="wsm", weights=weights, spacing=200, window_steps=400)  # tokens = 1000 × step
    steps = merge.select(range(100, 1100, 100))
    assert steps == [600, 800, 1000] and "chose steps [1000, 800, 600]" in stdout
    weight = merge.weights_for(steps)
    manifest = slots.read_manifest(str(out))
    assert manifest.steps_averaged == steps[::-1] and manifest.merge_weights == pytest.approx(weight[::-1])
    from core.zero_folder import consolidate as ours

    parts = [ours(str(tmp_path / "snapshots" / step_name(s))) for s in steps]
    want = {k: sum(w * p[k].double() for w, p in zip(weight, parts)) for k in parts[0]}
    assert max_diff(ours(str(out)), want) <= 1e-6
    assert max_diff(ours(str(out)), mean_of(parts)) > 1e-3  # not the uniform mean


def test_hf_folders_merge_with_a_decay_weighting(hf_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from averaging.lawa import merge_weights

    code, _, err = cli(capsys, "--out", tmp_path / "m", "--from-dir", hf_models["single"][0].parent, "--k", 3,
                       "--weights", "cosine")
    assert code == 0, err

    def load(p):
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True).state_dict()
    weight = merge_weights([100, 200, 300], "cosine")
    parts = [load(p) for p in hf_models["single"]]
    want = {k: sum(w * p[k].double() for w, p in zip(weight, parts)) for k in parts[0]}
    assert max_diff(load(tmp_path / "m"), want) <= 1e-6


@pytest.mark.parametrize("name,step", [("step_00001000", 1000), ("global_step42", 42), ("checkpoint-500", 500),
                                       ("lawa_best", None), ("step_12a", None)])
def test_step_names(name, step):
    assert any_step_of(f"/runs/x/{name}/") == step


# ---------------------------------------------------------------------------------------------
# DeepSpeed checkpoints

DS_SCRIPT = textwrap.dedent("""
    import os, sys, torch, deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (3, 2):
        torch.manual_seed(stage)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.AdamW(model.parameters(), lr=0.05))
        for step in range(1, 7):
            engine.backward(engine(torch.randn(2, 5)).pow(2).mean())
            engine.step()
            if step % 2 == 0:
                engine.save_checkpoint(os.path.join(sys.argv[1], f"stage{stage}"), tag=f"global_step{step}")
""")


@pytest.fixture(scope="module")
def ds_checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    (root / "make.py").write_text(DS_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**launcher_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(root / "make.py"), str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


@pytest.mark.parametrize("stage", [3, 2])
def test_deepspeed_average_consolidates_to_the_mean(ds_checkpoints, tmp_path, capsys, stage):
    inputs = [ds_checkpoints / f"stage{stage}" / f"global_step{s}" for s in (2, 4, 6)]
    out = tmp_path / "averaged" / "lawa_k3"
    code, stdout, err = cli(capsys, "--out", out, *inputs)
    assert code == 0, err
    assert "weights only" in stdout.splitlines()[-1]
    assert (tmp_path / "averaged" / "latest").read_text() == "lawa_k3"

    want = mean_of([consolidate(p) for p in inputs])
    assert max(v.abs().max().item() for v in want.values()) > 0.01
    assert max_diff(consolidate(out), want) <= 1e-6
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    assert max_diff(get_fp32_state_dict_from_zero_checkpoint(str(out.parent)), want) <= 1e-6  # via `latest`

    optim = torch.load(out / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"]
    assert "optimizer_state_dict" not in optim and "base_optimizer_state" not in optim  # moments dropped
    model_file = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    module = torch.load(out / model_file, weights_only=False)["module"]
    if stage == 2:  # full weights live in the model states too: averaged as well
        assert max_diff({k: module[k] for k in want}, want) <= 1e-6
    assert torch.load(out / model_file, weights_only=False)["global_steps"] == 6  # the newest's


def test_deepspeed_refuses_different_stages(ds_checkpoints, tmp_path, capsys):
    a, b = ds_checkpoints / "stage3" / "global_step2", ds_checkpoints / "stage2" / "global_step4"
    code, _, err = cli(capsys, "--out", tmp_path / "out", a, b)
    assert code == 2 and str(a) in err and str(b) in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Hugging Face folders and state-dict files


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, list[Path]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("hf")
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50, n_positions=16)
    made = {"single": [], "sharded": []}
    for step in (100, 200, 300):
        torch.manual_seed(step)
        model = GPT2LMHeadModel(config)
        for layout, kwargs in (("single", {}), ("sharded", {"max_shard_size": "1KB"})):
            path = root / layout / f"checkpoint-{step}"
            model.save_pretrained(path, **kwargs)
            (path / "tokenizer_config.json").write_text(json.dumps({"saved_at": step}))
            (path / "optimizer.pt").write_bytes(b"training state")
            made[layout].append(path)
    assert len(list(made["sharded"][0].glob("*.safetensors"))) > 2
    return made


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hf_average_loads_and_equals_the_mean(hf_models, tmp_path, capsys, layout):
    from transformers import AutoModelForCausalLM

    inputs = hf_models[layout]
    out = tmp_path / "lawa"
    code, _, err = cli(capsys, "--out", out, *reversed(inputs))  # the newest by step, not by position
    assert code == 0, err
    newest = inputs[-1]
    def weight_files(d):
        return sorted(p.name for p in d.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))

    assert weight_files(out) == weight_files(newest)
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"saved_at": 300}
    assert (out / "config.json").exists() and not (out / "optimizer.pt").exists()

    def load(p):
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True).state_dict()
    want = mean_of([load(p) for p in inputs])
    got = load(out)
    assert max_diff(got, want) <= 1e-6


def test_safetensors_file_keeps_dtypes_and_metadata(tmp_path, capsys, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    monkeypatch.setattr(offline_common, "BLOCK_ELEMENTS", 4)  # several row blocks per tensor
    inputs = []
    for step in (1, 2, 3):
        torch.manual_seed(step)
        tensors = {"w": torch.randn(5, 3).to(torch.bfloat16), "s": torch.tensor(float(step)),
                   "ids": torch.arange(4) * step}
        inputs.append(tmp_path / f"step_{step}.safetensors")
        save_file(tensors, inputs[-1], metadata={"format": "pt"})
    out = tmp_path / "avg.safetensors"
    code, _, err = cli(capsys, "--out", out, *inputs)
    assert code == 0, err
    got, loaded = load_file(out), [load_file(p) for p in inputs]
    assert got["w"].dtype == torch.bfloat16
    assert torch.equal(got["w"], (sum(t["w"].float() for t in loaded) / 3).to(torch.bfloat16))
    assert got["s"].item() == 2.0
    assert torch.equal(got["ids"], loaded[-1]["ids"])  # integers are not averaged: the newest's
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_torch_file_round_trip_and_refusals(tmp_path, capsys):
    inputs = []
    for step in (10, 20, 30):
        torch.manual_seed(step)
        sd = OrderedDict(weight=torch.randn(4, 3), bias=torch.randn(3).half(), steps=torch.tensor(step))
        inputs.append(tmp_path / f"step_{step}.pt")
        torch.save({"model": sd, "step": step, "optimizer": {"exp_avg": torch.randn(4, 3)}}, inputs[-1])
    out = tmp_path / "avg.pt"
    code, stdout, err = cli(capsys, "--out", out, *inputs)
    assert code == 0, err
    got = torch.load(out, weights_only=True)
    assert set(got) == {"model", "step"} and got["step"] == 30  # weights only; the rest from the newest
    sds = [torch.load(p, weights_only=True)["model"] for p in inputs]
    assert torch.allclose(got["model"]["weight"], sum(sd["weight"] for sd in sds) / 3, atol=1e-6)
    assert got["model"]["bias"].dtype == torch.float16 and got["model"]["steps"].item() == 30

    code, _, err = cli(capsys, "--out", out, *inputs)  # OUT exists
    assert code == 2 and "--force" in err
    assert cli(capsys, "--out", out, "--force", *inputs[:2])[0] == 0
    assert torch.load(out, weights_only=True)["step"] == 20

    del sds[0]["bias"]
    torch.save({"model": sds[0]}, inputs[0])
    code, _, err = cli(capsys, "--out", tmp_path / "avg2.pt", *inputs)
    assert code == 2 and "bias" in err and str(inputs[0]) in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# the command line itself


def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "averaging.offline", *map(str, argv)], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=120)


def test_cli_user_errors_are_one_line_exit_2(tmp_path):
    slot = make_slot(tmp_path, 100)
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    torch.save({"w": torch.ones(2)}, tmp_path / "sd2.pt")
    for argv, says in ((["--out", tmp_path / "o", slot, tmp_path / "missing"], "no such file"),
                       (["--out", tmp_path / "o", slot, tmp_path / "sd.pt"], "different kinds"),
                       (["--out", tmp_path / "o"], "nothing to average"),
                       (["--out", tmp_path / "o", "--from-dir", tmp_path, "--k", "2", "--window-tokens", "9"],
                        "give --k or --window-tokens, not both"),
                       (["--out", tmp_path / "o.pt", "--weights", "linear", tmp_path / "sd.pt", tmp_path / "sd2.pt"],
                        "--weights linear: cannot tell the step of"),
                       (["--out", tmp_path / "o", "--weights", "harmonic", slot], "invalid choice: 'harmonic'")):
        proc = run_cli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and says in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()
