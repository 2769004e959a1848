"""Hugging Face export/import: our models and transformers' compute the same logits from the
exported weights, and import -> export is exact."""
import json
import subprocess
import sys

import pytest
import torch

from models.hf import export, read_folder
from models.registry import build_model, config_to_dict, model_config

VARIANTS = {
    "gpt2": dict(size="micro"),
    "gpt2-no-bias": dict(size="micro", bias=False),
    "gpt2-scaled": dict(size="micro", scale_attn_by_inverse_layer_idx=True),
    "gpt2-lawa": dict(size="micro", bias=False, scale_attn_by_inverse_layer_idx=True),  # the LAWA recipes' options
    "neox": dict(size="neox-micro"),
    "neox-sequential": dict(size="neox-micro", parallel_residual=False, rotary_pct=0.5),
}


def randomized(config):
    """Every weight random (LayerNorms included), so that a wrong mapping cannot hide behind ones and zeros."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_model_computes_our_logits_in_transformers(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    fields = dict(VARIANTS[variant])
    config = model_config(fields.pop("size"), vocab_size=96, block_size=32, **fields)
    model = randomized(config)
    export(model.state_dict(), config, str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 96, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["gpt2", "gpt2-scaled", "neox"])
def test_import_then_export_is_exact(variant, tmp_path):
    fields = dict(VARIANTS[variant])
    config = model_config(fields.pop("size"), vocab_size=96, block_size=32, **fields)
    state = randomized(config).state_dict()
    export(state, config, str(tmp_path / "a"))
    imported, imported_config = read_folder(str(tmp_path / "a"))
    assert config_to_dict(imported_config) == config_to_dict(config)
    assert set(imported) == set(state) and all(torch.equal(imported[k], state[k]) for k in state)
    export(imported, imported_config, str(tmp_path / "b"))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architectures"] == \
        [{"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM"}[config.family]]


def test_import_cli_writes_our_state_dict_and_names_bad_folders(tmp_path):
    config = model_config("neox-micro", vocab_size=96, block_size=32)
    state = randomized(config).state_dict()
    export(state, config, str(tmp_path / "hf"))
    run = [sys.executable, "-m", "models.hf", "import"]
    proc = subprocess.run(run + [str(tmp_path / "hf"), "--out", str(tmp_path / "m.pt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    saved = torch.load(tmp_path / "m.pt")
    assert saved["model"] == config_to_dict(config)
    assert all(torch.equal(saved["state_dict"][k], state[k]) for k in state)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    proc = subprocess.run(run + [str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert proc.returncode == 2 and "only gpt2 and gpt_neox" in proc.stderr and "Traceback" not in proc.stderr
