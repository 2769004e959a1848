"""Hugging Face export/import: our models and transformers' compute the same logits from the
exported weights, and import -> export is exact."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.hf import export, read_folder
from models.registry import build_model, config_to_dict, model_config

VARIANTS = {
    "gpt2": dict(size="micro"),
    "gpt2-no-bias": dict(size="micro", bias=False),
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


@pytest.mark.parametrize("variant", ["gpt2", "neox"])
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
        [{"gpt2": "GPT2LMHeadModel", "neox": "GPTNeoXForCausalLM"}[variant]]


def test_lm_eval_scores_an_exported_model_like_our_scorer(tmp_path):
    """EleutherAI's harness runs on an exported model with a local task file; its accuracies equal
    averaging.zero_shot's on the same weights."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from averaging.zero_shot import evaluate_task, full_logits, load_task, summarize
    from core.tokenizer import load_tokenizer

    texts = [t for t in topics.values() if len(t.split()) >= 16]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

    config = model_config("neox-micro", vocab_size=320, block_size=64)
    model = randomized(config)
    export(model.state_dict(), config, str(tmp_path / "hf"), str(tok_dir / "tokenizer.json"))

    records = [{"context": " ".join(t.split()[:8]), "choices": [" " + " ".join(t.split()[8:12]),
                                                              " " + " ".join(o.split()[8:14])], "answer": i % 2}
               for i, (t, o) in enumerate(zip(texts[:12], texts[12:24]))]
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local_choice.yaml").write_text(
        "task: local_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "target_delimiter: \"\"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                           f"pretrained={tmp_path / 'hf'},dtype=float32", "--tasks", "local_choice",
                           "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                           "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result_file,) = (tmp_path / "out").rglob("results*.json")
    results = json.loads(result_file.read_text())
    theirs = results["results"]["local_choice"]
    assert results["n-samples"]["local_choice"]["effective"] == len(records)

    task = load_task(str(data))
    encode = load_tokenizer(str(tmp_path / "hf" / "tokenizer.json")).encode
    with torch.no_grad():
        ours = summarize(task, evaluate_task(task, full_logits(model), encode, 64, torch.device("cpu")))
    assert theirs["acc,none"] == pytest.approx(ours["acc"]) and theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"])


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
