"""Corpora tokenized elsewhere, read as they are: nanoGPT flat files and Megatron indexed datasets
(written with megatron-core's own builder) come back as the very tokens written, split as the docs
say, mixed with text sources; what cannot be read is one line naming the key or file; and an
interrupted preparation keeps what it finished."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO
from launcher.data import DataArgs, DataSource, TokenBatches, load_manifest, prepare
from launcher.data.tokenized import open_shard

SEQ = 16
VOCAB = 512  # the pydoc tokenizer's entries: ids 1..511 are words, 0 ends a document


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    prepare(DataArgs(dir=str(d), vocab_size=VOCAB, seq_len=SEQ), progress=False)
    return str(d / "tokenizer.json")


def documents(n: int, seed: int, eos: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.append(rng.integers(1, VOCAB, rng.integers(20, 200)), eos) for _ in range(n)]


def megatron_dataset(prefix: str, docs: list[np.ndarray], dtype=np.uint16) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import's (no Transformer Engine) and numpy 2's about __array__
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for doc in docs:
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        builder.finalize(prefix + ".idx")


def split_tokens(data_dir: str, manifest: dict, source: int, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(open_shard(data_dir, s, manifest["dtype"]))
                           for s in manifest["sources"][source][f"{split}_shards"]])


def assert_batches_are_the_tokens(manifest: dict, data_dir: str, source: int, train: np.ndarray, val: np.ndarray):
    """Every training window is a run of `train`; the held-out windows tile `val` exactly."""
    weights = [1.0 if i == source else 0.0 for i in range(len(manifest["sources"]))]
    batches = TokenBatches(manifest, data_dir, weights, SEQ, seed=3)
    windows = np.lib.stride_tricks.sliding_window_view(train, SEQ + 1)
    for step in range(4):
        x, y = batches.train_batch(step, 0, 0, 32)
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            assert (windows == row).all(1).any()
    tiles = {tuple(t) for t in val[: len(val) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)}
    got = batches.val_batches(source, 0, 1, len(tiles), 1)
    assert {tuple(torch.cat([x, y[:, -1:]], 1)[0].tolist()) for x, y in got} == tiles


def test_a_nanogpt_folder_reads_train_bin_and_val_bin_where_they_lie(tokenizer, tmp_path):
    train, val = np.concatenate(documents(300, 1)), np.concatenate(documents(40, 2))
    (tmp_path / "owt").mkdir()
    train.astype(np.uint16).tofile(tmp_path / "owt" / "train.bin")
    val.astype(np.uint16).tofile(tmp_path / "owt" / "val.bin")
    args = DataArgs(sources=[DataSource(str(tmp_path / "owt"))], dir=str(tmp_path / "d"), tokenizer=tokenizer,
                    seq_len=SEQ)
    m = prepare(args, progress=False)
    src = m["sources"][0]
    assert src["kind"] == "nanogpt" and (src["train_tokens"], src["val_tokens"]) == (len(train), len(val))
    assert (src["documents"], src["train_documents"], src["val_documents"]) == (340, 300, 40)
    assert src["train_shards"][0]["file"] == str(tmp_path / "owt" / "train.bin")  # read where it lies
    assert not [f for f in os.listdir(args.dir) if f.endswith(".bin")]
    assert args.source_names() == ["owt"]
    assert np.array_equal(split_tokens(args.dir, m, 0, "train"), train)
    assert_batches_are_the_tokens(m, args.dir, 0, train, val)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_one_flat_file_holds_out_its_end_after_a_document(tokenizer, tmp_path, dtype):
    stream = np.concatenate(documents(200, 3))
    stream.astype(dtype).tofile(tmp_path / "corpus.bin")
    args = DataArgs(sources=[DataSource(str(tmp_path / "corpus.bin"), dtype=dtype if dtype != "uint16" else None)],
                    dir=str(tmp_path / "d"), tokenizer=tokenizer, seq_len=SEQ, val_fraction=0.1)
    m = prepare(args, progress=False)
    src = m["sources"][0]
    cut = src["train_tokens"]
    assert stream[cut - 1] == 0  # just after an end-of-text token
    assert abs(src["val_tokens"] - 0.1 * len(stream)) < 200 and src["val_tokens"] >= 0.1 * len(stream)
    assert np.array_equal(split_tokens(args.dir, m, 0, "val"), stream[cut:])
    assert_batches_are_the_tokens(m, args.dir, 0, stream[:cut], stream[cut:])


def test_a_megatron_indexed_dataset_splits_by_documents(tokenizer, tmp_path):
    docs = documents(120, 4)
    megatron_dataset(str(tmp_path / "pile_text_document"), docs)
    args = DataArgs(sources=[DataSource(str(tmp_path / "pile_text_document"))], dir=str(tmp_path / "d"),
                    tokenizer=tokenizer, seq_len=SEQ, val_fraction=0.1)
    m = prepare(args, progress=False)
    src = m["sources"][0]
    assert src["kind"] == "megatron" and src["documents"] == 120
    ends = np.cumsum([len(d) for d in docs])
    assert src["train_tokens"] in ends  # between two documents
    n_val = 120 - src["train_documents"]
    assert n_val == src["val_documents"] and sum(len(d) for d in docs[-n_val:]) >= 0.1 * ends[-1] > \
        sum(len(d) for d in docs[-n_val + 1:])  # the fewest last documents holding val_fraction
    stream = np.concatenate(docs)
    assert_batches_are_the_tokens(m, args.dir, 0, stream[:src["train_tokens"]], stream[src["train_tokens"]:])


def test_text_and_token_sources_mix_by_weight_with_their_own_held_out_loss(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("\n\n".join(f"Note {i}: text to tokenize here." * 5 for i in range(80)))
    np.concatenate(documents(100, 5)).astype(np.uint16).tofile(tmp_path / "flat.bin")
    megatron_dataset(str(tmp_path / "idx"), documents(100, 6))
    args = DataArgs(sources=[DataSource(str(tmp_path / "notes.txt"), weight=1), DataSource(str(tmp_path / "flat.bin"), weight=2),
                             DataSource(str(tmp_path / "idx.bin"), weight=0)],
                    dir=str(tmp_path / "d"), tokenizer=tokenizer, seq_len=SEQ)
    m = prepare(args, progress=False)
    assert [s["kind"] for s in m["sources"]] == ["text", "nanogpt", "megatron"]
    batches = TokenBatches(m, args.dir, [1, 2, 0], SEQ, seed=0, names=args.source_names())
    assert batches.held_out_sources() == [0, 1, 2]  # the held-out-only indexed dataset is scored too
    assert list(batches.probs) == pytest.approx([1 / 3, 2 / 3, 0])


def lawa_prepare(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.prepare", "--job", "jobs/smoke.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_what_cannot_be_read_is_one_line(tokenizer, tmp_path):
    good = documents(50, 7)
    megatron_dataset(str(tmp_path / "ds"), good)
    with open(tmp_path / "ds.idx", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "ds.idx") // 2)
    assert_one_line(lawa_prepare(f"data.dir={tmp_path / 'a'}", f"data.tokenizer={tokenizer}",
                                 f"data.sources=[{{path: {tmp_path / 'ds'}}}]"),
                    "data.sources[0].path", "ds.idx is not a readable Megatron index (it holds", "truncated")
    assert_one_line(lawa_prepare(f"data.dir={tmp_path / 'b'}", f"data.tokenizer={tokenizer}",
                                 f"data.sources=[{{path: {tmp_path / 'nowhere'}, format: nanogpt}}]"),
                    "data.sources[0].path: no such file or directory")
    # Made with another tokenizer: an id past this one's entries.
    np.append(np.concatenate(good), [VOCAB + 7, 0]).astype(np.uint16).tofile(tmp_path / "other.bin")
    assert_one_line(lawa_prepare(f"data.dir={tmp_path / 'c'}", f"data.tokenizer={tokenizer}",
                                 f"data.sources=[{{path: {tmp_path / 'other.bin'}}}]"),
                    "data.sources[0]", f"holds token id {VOCAB + 7}, but data.tokenizer has {VOCAB} entries")
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    assert_one_line(lawa_prepare(f"data.dir={tmp_path / 'd'}", f"data.tokenizer={tokenizer}",
                                 f"data.sources=[{{path: {tmp_path / 'odd.bin'}}}]"),
                    "odd.bin holds 3 bytes, not a whole number of uint16 ids")
    assert_one_line(lawa_prepare(f"data.dir={tmp_path / 'e'}", f"data.sources=[{{path: {tmp_path / 'other.bin'}}}]"),
                    "data.tokenizer:", "holds token ids; give the tokenizer they were made with")


def test_a_killed_preparation_keeps_its_finished_units(tokenizer, tmp_path):
    """kill -9 in the middle: the next run says how many units it keeps, tokenizes only the rest, and
    gives the data dir an uninterrupted run gives."""
    text = tmp_path / "big.txt"
    with open(text, "w") as f:
        for i in range(6000):
            f.write(f"Paragraph {i} of a file big enough to take a while to tokenize. " * 8 + "\n\n")
    job = [f"data.tokenizer={tokenizer}", f"data.sources=[{{path: {text}}}]", "--unit-mb", "0.05", "--processes", "2"]
    cmd = [sys.executable, "-m", "launcher.prepare", "--job", "jobs/smoke.yaml", f"data.dir={tmp_path / 'k'}", *job]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    state = tmp_path / "k" / ".prepare"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(state.glob("*.json"))) < 4:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(state.glob("0_*.json")))
    assert finished >= 3 and load_manifest(str(tmp_path / "k")) is None
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    kept = int(again.stdout.split("resuming an interrupted preparation")[1].split(": ")[1].split(" of ")[0])
    total = int(again.stdout.split(" units are done")[0].rsplit(" of ", 1)[1])
    assert kept >= finished and f"preparing {total - kept} units" in again.stdout
    whole = lawa_prepare(f"data.dir={tmp_path / 'w'}", *job)
    assert whole.returncode == 0, whole.stderr
    a, b = load_manifest(str(tmp_path / "k")), load_manifest(str(tmp_path / "w"))
    assert a["sources"] == b["sources"] and not state.exists()
    assert not [f for f in os.listdir(tmp_path / "k") if ".partial-" in f]  # what the killed workers were writing
    for shard in a["sources"][0]["train_shards"] + a["sources"][0]["val_shards"]:
        assert np.array_equal(open_shard(str(tmp_path / "k"), shard, "uint16"), open_shard(str(tmp_path / "w"), shard, "uint16"))
