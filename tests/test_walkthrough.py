"""The walkthrough of docs/cluster.md, as a researcher runs it with their own corpus and tokenizer, on a
real Slurm: text files and a byte-level BPE tokenizer.json -> `sbatch slurm/prepare.sh` (a CPU job)
-> `sbatch --dependency=afterok:<id> slurm/pretrain.sh` with the paper's 125M high-LR recipe shrunk
on the command line, the sidecar on -> `python -m models.hf export` of lawa_best -> transformers and
`lm_eval --model hf` take the folder as it is, and score a shipped task as our own backend does on
the slot it came from."""
from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

from averaging.sidecar.protocol import read_eval_log
from conftest import REPO, launcher_env, read_metrics
from harness_checks import assert_same_scores, ours, run, theirs

pytestmark = pytest.mark.distributed

WORDS = ("the of and to in is was for on that with as by at from it his an were are which this be model "
         "data run weights average learning rate step loss token layer cluster node train").split()


def corpus(folder: Path, megabytes: float) -> Path:
    """Plain-text files of documents separated by blank lines, from a fixed seed."""
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for part in range(2):
        with open(folder / f"part-{part}.txt", "w") as f:
            written = 0
            while written < megabytes * 1e6 / 2:
                sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
                             for _ in range(rng.randint(2, 8))]
                text = " ".join(sentences) + "\n\n"
                f.write(text)
                written += len(text)
    return folder


def user_tokenizer(path: Path, texts: Path) -> Path:
    """What a user brings: a byte-level BPE tokenizer.json (GPT-2's kind) made with `tokenizers`, alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in sorted(texts.glob("*.txt"))], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_own_corpus_to_sbatch_to_an_export_transformers_and_lm_eval_load(slurm, tmp_path):
    texts = corpus(tmp_path / "corpus", megabytes=3)
    tokenizer = user_tokenizer(tmp_path / "tokenizers" / "tokenizer.json", texts)
    data, run_dir = tmp_path / "tokens", tmp_path / "run"
    job = ["--job", "jobs/gpt2_125m_high_lr.yaml", f"data.sources=[{{path: {texts}}}]", f"data.tokenizer={tokenizer}",
           f"data.dir={data}", "data.val_fraction=0.02", "data.seq_len=64"]
    micro = [f"run_dir={run_dir}", "model.size=micro", "model.vocab_size=512", "model.block_size=64",
             "train.steps=24", "train.global_batch_size=8", "train.micro_batch_size=2", "train.precision=fp32",
             "schedule.warmup_steps=4", "schedule.decay_steps=24", "snapshot.every=4", "lawa.spacing=4", "lawa.k=3",
             "eval.every=8", "eval.batches=2", "checkpoint.every=12", "logging.every=4", "sidecar.poll_seconds=0.2",
             f"snapshot.dir={tmp_path / 'ring'}"]
    env = dict(launcher_env(), PYTHON=sys.executable, REPO=str(REPO))
    prepare = slurm.sbatch("--cpus-per-task=2", str(REPO / "slurm/prepare.sh"), *job, "--unit-mb", "0.5", env=env, cwd=str(tmp_path))
    train = slurm.sbatch("--dependency=afterok:" + str(prepare), "--ntasks-per-node=2", "--gpus-per-node=0",
                         "--cpus-per-task=1", "--time=20", str(REPO / "slurm/pretrain.sh"), *job, *micro,
                         env=env, cwd=str(tmp_path))
    prepared = slurm.wait(prepare, timeout=300)
    log = (tmp_path / f"slurm-lawa-prepare-{prepare}.out").read_text()
    assert prepared["JobState"] == "COMPLETED", log
    units = int(re.search(r"preparing (\d+) units", log).group(1))
    assert units > 2 and "with 2 processes" in log and f"{units}/{units} units" in log and "M tokens/s, ETA" in log
    trained = slurm.wait(train, timeout=600)
    out = (run_dir / "logs" / f"sbatch-{train}.out").read_text()
    assert trained["JobState"] == "COMPLETED", out + (run_dir / "logs" / f"slurm-{train}-0-rank0.log").read_text()[-3000:]
    assert slurm.job(train)["StartTime"] >= prepared["EndTime"]
    # The batch step checked the job and found the data prepared: no rank tokenized anything.
    assert "job ok: gpt2_125m_high_lr: world 2 = tensor 1 × data 2" in out and "data: the run reads" in out
    assert "preparing" not in out and "ready: the ranks may start" in out
    assert sorted(r["step"] for r in read_metrics(run_dir) if "loss" in r) == [4, 8, 12, 16, 20, 24]

    best = sorted((run_dir / "lawa_best").glob("step_*"))[-1]
    export = run([sys.executable, "-m", "models.hf", "export", str(best), "--out", str(tmp_path / "hf")], tmp_path)
    assert export.returncode == 0 and "note:" not in export.stdout, export.stdout + export.stderr

    from transformers import AutoTokenizer

    from core.tokenizer import load_tokenizer

    hf_tok, ours_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf")), load_tokenizer(str(data))
    for text in ("The model was trained on the cluster.", "  two  spaces,\ttabs\nand ünïcödé 日本語 🎉",
                 (texts / "part-1.txt").read_text()[-500:]):
        assert hf_tok(text)["input_ids"] == ours_tok.encode(text)
        assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    tasks = ["tiny_choice", "tiny_last_word"]
    mine, reference = ours(best, tasks, tmp_path), theirs(tmp_path / "hf", tasks, tmp_path)
    assert_same_scores(mine, reference, tasks)
    assert best.name in {f"step_{r['step']:08d}" for r in read_eval_log(str(run_dir))}
