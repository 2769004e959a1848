"""Corpora tokenized elsewhere, read where they lie (nothing is copied into the data dir):

  nanogpt    flat files of token ids with no header, as nanoGPT's data/*/prepare.py writes them:
             a folder with train.bin and val.bin (each its split), or one .bin file (its last
             val_fraction held out, cut just after an end-of-text token when one is near);
             `dtype` uint16 (nanoGPT's, for GPT-2's 50257 tokens) or uint32
  megatron   a Megatron-LM / GPT-NeoX indexed dataset (`<prefix>.bin` + `<prefix>.idx`, as
             tools/preprocess_data.py writes it; the Pile as Pythia was trained on it), opened with
             megatron-core's own IndexedDataset; its last documents are held out by the rule of
             launcher/data/split.py

Each becomes a source whose splits are (file, byte offset, tokens) ranges. Every id is checked
against the tokenizer's vocabulary when the data dir is prepared (launcher/data/units.py scans the
ranges in parallel): a corpus made with another tokenizer is one line, not a device-side assert at
the first step. Documents are counted by end-of-text tokens in flat files, by the index in
indexed datasets (whose documents may carry no end-of-text token: windows then run from one
document into the next with nothing between, as Megatron's own GPT dataset does).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from launcher.data.sources import DataSource, source_key
from launcher.data.split import documents_split, train_tokens

EOS_SEARCH_TOKENS = 1 << 20  # how far back from a flat file's cut an end-of-text token is looked for
INDEX_BLOCK = 1 << 24  # sequences of an index read at a time


@dataclass
class TokenRange:
    path: str  # absolute
    offset: int  # bytes
    tokens: int
    dtype: str

    def shard(self) -> dict:
        return {"file": self.path, "offset": self.offset, "tokens": self.tokens, "dtype": self.dtype}

    @property
    def first(self) -> int:
        """Index of its first id in the file."""
        return self.offset // np.dtype(self.dtype).itemsize


@dataclass
class TokenSource:
    kind: str  # nanogpt | megatron
    train: TokenRange
    val: TokenRange
    documents: Optional[tuple[int, int, int]] = None  # (all, train, val), when the format records them
    notes: list[str] = field(default_factory=list)


def open_token_source(i: int, source: DataSource, kind: str, files: list[str], eos_id: int, val_fraction: float,
                      window: int) -> TokenSource:
    if kind == "nanogpt":
        return _nanogpt(i, source, files, eos_id, val_fraction, window)
    return _megatron(i, source, files[0], val_fraction, window)


def _whole_ids(i: int, path: str, dtype: str) -> int:
    size = os.path.getsize(path)
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise ValueError(f"{source_key(i)}: {path} holds {size} bytes, not a whole number of {dtype} ids "
                         f"(data.sources[{i}].dtype: uint16 or uint32)")
    return size // itemsize


def _nanogpt(i: int, source: DataSource, files: list[str], eos_id: int, val_fraction: float,
             window: int) -> TokenSource:
    dtype = source.dtype or "uint16"
    what = f"data.sources[{i}] ({source.path!r})"
    train_path = os.path.abspath(files[0])
    n = _whole_ids(i, train_path, dtype)
    if len(files) > 1:
        val_path = os.path.abspath(files[1])
        m = _whole_ids(i, val_path, dtype)
        for name, count in (("train.bin", n), ("val.bin", m)):
            if count < window:
                raise ValueError(f"{what} is too small: its {name} holds {count} tokens, but data.seq_len={window - 1} "
                                 f"needs windows of {window}")
        return TokenSource("nanogpt", TokenRange(train_path, 0, n, dtype), TokenRange(val_path, 0, m, dtype))
    cut = n - max(window, int(np.ceil(n * val_fraction)))
    if cut < window:
        raise ValueError(f"{what} is too small: {n} tokens, but data.seq_len={window - 1} needs windows of {window} "
                         f"tokens in both its train and val split (at least {2 * window} tokens)")
    ids = np.memmap(train_path, dtype=dtype, mode="r")
    look = np.asarray(ids[max(window, cut - EOS_SEARCH_TOKENS):cut])
    found = np.flatnonzero(look == eos_id)
    notes = []
    if len(found):
        cut = max(window, cut - EOS_SEARCH_TOKENS) + int(found[-1]) + 1
    else:
        notes.append(f"{what}: no end-of-text token within {EOS_SEARCH_TOKENS} tokens before its held-out cut: "
                     "the split falls inside a document")
    itemsize = np.dtype(dtype).itemsize
    return TokenSource("nanogpt", TokenRange(train_path, 0, cut, dtype),
                       TokenRange(train_path, cut * itemsize, n - cut, dtype), notes=notes)


INDEX_MAGIC = b"MMIDIDX\x00\x00"  # the first bytes of a Megatron .idx file (format version 1)


def _check_index_size(i: int, prefix: str) -> None:
    """The .idx is as long as its header says, before megatron-core maps it (it fails on a truncated
    file from inside numpy, and again in its object's destructor)."""
    import struct

    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(34)
    problem = None
    if len(head) < 34 or head[:9] != INDEX_MAGIC:
        problem = "it does not start as a Megatron index does"
    else:
        version, _, sequences, documents = struct.unpack("<QBQQ", head[9:34])
        expected = 34 + sequences * (4 + 8) + documents * 8
        if version != 1:
            problem = f"index format version {version}, not 1"
        elif size < expected:
            problem = f"it holds {size} bytes, its header describes {expected}"
    if problem:
        raise ValueError(f"{source_key(i)}: {path} is not a readable Megatron index ({problem}): truncated or not "
                         f"an indexed dataset; write it again")


def _open_indexed(i: int, prefix: str):
    """megatron-core's IndexedDataset, its import's warnings (no Transformer Engine or Apex, which
    reading needs neither of) kept quiet."""
    _check_index_size(i, prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    return IndexedDataset(prefix, multimodal=False, mmap=True)


def _megatron(i: int, source: DataSource, prefix: str, val_fraction: float, window: int) -> TokenSource:
    if source.dtype is not None:
        raise ValueError(f"data.sources[{i}].dtype: an indexed dataset records its own dtype; leave it unset")
    what = f"data.sources[{i}] ({source.path!r})"
    index = _open_indexed(i, prefix).index
    dtype = np.dtype(index.dtype).name
    if np.dtype(dtype).kind not in "ui":
        raise ValueError(f"{source_key(i)}: {prefix} holds {dtype} values, not token ids")
    itemsize = np.dtype(dtype).itemsize
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    if len(lengths) == 0 or len(docs) < 2:
        raise ValueError(f"{what} holds no documents")
    # Each document's last sequence (empty documents left out), and the token position after it,
    # a block of the index at a time (the Pile's index has hundreds of millions of sequences).
    last = np.asarray(docs[1:], dtype=np.int64)[np.asarray(docs[1:]) > np.asarray(docs[:-1])] - 1
    ends = np.empty(len(last), dtype=np.int64)
    total, done = 0, 0
    for a in range(0, len(lengths), INDEX_BLOCK):
        block = np.asarray(lengths[a:a + INDEX_BLOCK], dtype=np.int64)
        here = np.asarray(pointers[a:a + INDEX_BLOCK + 1], dtype=np.int64)
        # The splits are read as two runs of the .bin: its sequences must follow one another.
        if not np.array_equal(here[1:] - here[:-1], block[:len(here) - 1] * itemsize):
            raise ValueError(f"{source_key(i)}: {prefix}.bin's sequences do not follow one another in the file "
                             "(not written in order by IndexedDatasetBuilder); write it again")
        running = np.cumsum(block) + total
        k = int(np.searchsorted(last, a + len(block), side="left"))
        ends[done:k] = running[last[done:k] - a]
        done, total = k, int(running[-1])
    end = int(pointers[0]) + total * itemsize
    size = os.path.getsize(prefix + ".bin")
    if size < end:
        raise ValueError(f"{source_key(i)}: {prefix}.bin holds {size} bytes, its index describes {end}: the .bin "
                         "is truncated; write it again")
    cut = train_tokens(ends, val_fraction, window, what)
    n_train_docs, n_val_docs = documents_split(ends, cut)
    path, start = os.path.abspath(prefix + ".bin"), int(pointers[0])
    return TokenSource("megatron", TokenRange(path, start, cut, dtype),
                       TokenRange(path, start + cut * itemsize, total - cut, dtype),
                       documents=(len(ends), n_train_docs, n_val_docs))


def open_shard(data_dir: str, shard: dict, dtype: str) -> np.memmap:
    """A shard's tokens, mapped: `file` (relative to the data dir, or absolute for a corpus read where
    it lies), from byte `offset`, `tokens` ids of `dtype` (the shard's own when it names one). A file
    shorter than that is one line: the data dir (or the corpus) was damaged."""
    path = os.path.join(data_dir, shard["file"])
    dtype = np.dtype(shard.get("dtype", dtype))
    offset, tokens = int(shard.get("offset", 0)), int(shard["tokens"])
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size is None or size < offset + tokens * dtype.itemsize:
        raise ValueError(f"data.dir: {path} holds {size} bytes, the manifest reads {tokens} ids of {dtype} from byte "
                         f"{offset}; the data was changed or damaged: prepare it again")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(tokens,))
