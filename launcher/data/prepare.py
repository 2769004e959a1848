"""Preparation, once, on the main rank: every source -> tokenizer -> flat binary token files.

    <data.dir>/tokenizer.model | tokenizer.json   the tokenizer, so the directory is self-contained
    <data.dir>/{source}_{train|val}_{shard:05d}.bin  token ids (uint16 or uint32), documents
                                                     separated by the tokenizer's EOS id
    <data.dir>/manifest.json                         what was written, and a fingerprint of the
                                                     arguments it was prepared from
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np

from core.files import write_file_atomic
from core.log import logger
from core.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from launcher.data.mixture import BigramCounts, entropy_weights
from launcher.data.sources import (
    BUILTIN_CORPORA,
    DataArgs,
    datasets_module,
    is_document,
    load_source,
    resolve_source,
    texts,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_NAME = re.compile(r"^\d+_(train|val)_\d{5}\.bin$")
# sentencepiece's BPE trainer gives a different (but reproducible) model for each thread count, so
# the count is fixed rather than taken from the machine: the same text must give the same model.
SPM_TRAIN_THREADS = 8
# BPE training time and memory grow with the text; tens of MB of text are plenty for the vocab
# sizes used here, so larger corpora are subsampled (deterministically) for the trainer.
SPM_TRAIN_MAX_CHARS = 50_000_000
# sentencepiece skips longer sentences; long lines are cut into pieces of this many characters.
SPM_SENTENCE_CHARS = 4096
# Above this much Arrow data per source, tokenization is spread over processes.
PARALLEL_MAP_BYTES = 256 << 20
# Characters of text per tokenization batch, and token ids per batch written to the shards.
MAP_BATCH_CHARS = 4 << 20
WRITE_BATCH_TOKENS = 16 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")



def _train_sentencepiece(sentences: Iterator[str], vocab_size: int) -> Tokenizer:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.set_random_generator_seed(1)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocab rather than an error
            byte_fallback=True,  # every string is encodable, no <unk>
            # Lossless: the model must reproduce the text exactly, whitespace and all.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,  # indentation becomes few tokens
            split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            input_sentence_size=0,  # use every sentence given (subsampling is done by the caller)
            max_sentence_length=4 * SPM_SENTENCE_CHARS,
            num_threads=SPM_TRAIN_THREADS,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(f"data.vocab_size={vocab_size}: sentencepiece could not train a "
                         f"tokenizer: {e}") from e
    return Tokenizer("sentencepiece", model.getvalue(), what="data.tokenizer")



def _tokenizer_sentences(sources: list, val_fraction: float) -> Iterator[str]:
    """Lines of the text each source will keep for training, for the tokenizer trainer.

    Token counts are only known after tokenization, so the split is _train_token_count's rule
    (the last documents go to val until it holds val_fraction of the source) applied to character
    counts instead: the tokenizer never learns from held-out documents, up to the boundary document.
    """
    import pyarrow.compute as pc

    spans, chars = [], 0
    for ds in sources:
        lengths = np.concatenate([
            pc.fill_null(pc.utf8_length(batch.column("text")), 0).to_numpy(zero_copy_only=False)
            for batch in ds.with_format("arrow").iter(batch_size=10_000)]).astype(np.int64)
        ends = np.cumsum(lengths)
        n_train = len(lengths)
        if n_train > 1:
            val_chars = math.ceil(int(ends[-1]) * val_fraction)
            n_train = min(n_train - 1, max(1, int(np.searchsorted(ends, int(ends[-1]) - val_chars, side="right"))))
        spans.append(n_train)
        chars += int(ends[n_train - 1]) if n_train else 0
    stride = max(1, math.ceil(chars / SPM_TRAIN_MAX_CHARS))
    index = 0
    for ds, n_train in zip(sources, spans):
        for batch in texts(ds.select(range(n_train))):
            for text in batch:
                index += 1
                if (index - 1) % stride or not is_document(text):
                    continue
                if len(ds) == 1:  # a single document: only its leading part is train text
                    text = text[: max(1, int(len(text) * (1 - val_fraction)))]
                for line in text.split("\n"):
                    for start in range(0, len(line), SPM_SENTENCE_CHARS):
                        piece = line[start:start + SPM_SENTENCE_CHARS]
                        if not piece.isspace():
                            yield piece



# --------------------------------------------------------------------------------------------
# Preparation


def _train_token_count(doc_tokens: np.ndarray, val_fraction: float, window: int, what: str) -> int:
    """How many leading tokens of a source form its train split.

    The split falls between documents: the last documents go to val until it holds val_fraction
    of the tokens (and at least one window of seq_len+1 tokens). Counting tokens, not documents,
    keeps the held-out set its intended size when documents vary in length. A source that cannot
    be split so (a single document, or one huge last document) is cut inside the token stream.
    """
    n = len(doc_tokens)
    ends = np.cumsum(doc_tokens, dtype=np.int64)
    total = int(ends[-1]) if n else 0
    val_tokens = max(window, math.ceil(total * val_fraction))
    if n >= 2:
        n_train = min(n - 1, int(np.searchsorted(ends, total - val_tokens, side="right")))
        if n_train >= 1 and ends[n_train - 1] >= window:
            return int(ends[n_train - 1])
    cut = total - val_tokens
    if cut < window:
        raise ValueError(f"{what} is too small: {total} tokens in {n} documents, but data.seq_len="
                         f"{window - 1} needs windows of {window} tokens in both its train and val "
                         f"split (at least {2 * window} tokens)")
    return cut


class _ShardWriter:
    """Appends tokens to `{prefix}_{shard:05d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, directory: str, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._file is None:
                name = f"{self.prefix}_{len(self.shards):05d}.bin"
                self._file = open(os.path.join(self.directory, name), "wb")
                self.shards.append({"file": name, "tokens": 0})
            shard = self.shards[-1]
            part = tokens[: self.shard_tokens - shard["tokens"]]
            part.astype(self.dtype, copy=False).tofile(self._file)
            shard["tokens"] += len(part)
            tokens = tokens[len(part):]
            if shard["tokens"] == self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _tokenize(ds, tok: Tokenizer, i: int, cache_dir: str, progress: bool):
    """`ds` with its text replaced by token ids, EOS appended; blank documents dropped."""
    datasets = datasets_module()
    eos = tok.eos_id
    num_proc = None
    if ds.data.nbytes > PARALLEL_MAP_BYTES and (os.cpu_count() or 1) > 1:
        num_proc = min(os.cpu_count(), 16)
    # Worker processes each take a core; the tokenizer's own threads would only oversubscribe.
    threads = 1 if num_proc else 0

    def encode(batch):
        if "last" in batch:  # a .txt source in pieces (text_pieces left blank documents out): EOS at each end
            texts, ends = batch["text"], batch["last"]
        else:  # a record is a document; blank ones are dropped
            texts = [t for t in batch["text"] if is_document(t)]
            ends = [True] * len(texts)
        ids = tok.encode_batch(texts, threads)
        for doc, last in zip(ids, ends):
            if last:
                doc.append(eos)
        return {"ids": ids, "last": ends}

    value = "int32" if tok.vocab_size < 1 << 31 else "int64"
    # Batches of about MAP_BATCH_CHARS characters: token lists are Python objects, many bytes a token.
    mean_chars = ds.data.nbytes / max(1, len(ds))
    return ds.map(
        encode, batched=True, batch_size=max(1, min(1000, int(MAP_BATCH_CHARS / max(mean_chars, 1)))),
        remove_columns=ds.column_names, num_proc=num_proc,
        features=datasets.Features({"ids": datasets.List(datasets.Value(value)), "last": datasets.Value("bool")}),
        cache_file_name=os.path.join(cache_dir, f"tokens_{i}.arrow"),
        load_from_cache_file=False, new_fingerprint=f"tokens-{i}-{os.getpid()}-{time.time_ns()}",
        desc=f"tokenizing source {i}" if progress else None,
    )


def _write_source(tokens, i: int, args: DataArgs, dtype: np.dtype, vocab_size: int) -> dict:
    import pyarrow.compute as pc

    what = f"data.sources[{i}] ({args.sources[i].path!r})"
    tables = tokens.with_format("arrow")
    # Records are documents, or for a .txt source pieces of them: the split may fall between two
    # pieces of one long document, as it may fall inside a single-document source.
    lengths, ends_doc = [], []
    for b in tables.iter(batch_size=100_000):
        lengths.append(pc.list_value_length(b.column("ids")).to_numpy(zero_copy_only=False))
        ends_doc.append(b.column("last").to_numpy(zero_copy_only=False))
    doc_tokens = np.concatenate(lengths or [np.zeros(0, np.int64)])
    last = np.concatenate(ends_doc or [np.zeros(0, bool)]).astype(bool)
    document_of = np.cumsum(last) - last  # each record's document
    if len(doc_tokens) == 0 or not doc_tokens.any():
        raise ValueError(f"{what} holds no (non-blank) documents")
    n_train = _train_token_count(doc_tokens, args.val_fraction, args.seq_len + 1, what)
    train = _ShardWriter(args.dir, f"{i}_train", dtype, args.shard_tokens)
    val = _ShardWriter(args.dir, f"{i}_val", dtype, args.shard_tokens)
    pairs = BigramCounts(vocab_size)  # of the train split only: the mixture rule never sees held-out text
    written = 0
    for batch in tables.iter(batch_size=max(1, int(WRITE_BATCH_TOKENS / max(1.0, float(doc_tokens.mean()))))):
        flat = pc.list_flatten(batch.column("ids")).to_numpy(zero_copy_only=False)
        head = flat[: max(0, n_train - written)]
        train.write(head)
        pairs.add(head)
        val.write(flat[len(head):])
        written += len(flat)
    ends = np.cumsum(doc_tokens)
    return {
        "path": args.sources[i].path,
        "weight": args.sources[i].weight,
        "documents": int(last.sum()),
        # A document cut at the split counts in both.
        "train_documents": int(document_of[np.searchsorted(ends, n_train, side="left")]) + 1,
        "val_documents": int(last.sum()) - int(document_of[min(len(ends) - 1, np.searchsorted(ends, n_train, side="right"))]),
        "train_tokens": n_train,
        "val_tokens": written - n_train,
        "conditional_entropy": pairs.conditional_entropy(),
        "train_shards": train.close(),
        "val_shards": val.close(),
    }


@contextmanager
def _progress_bars(enabled: bool):
    datasets = datasets_module()
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()



def prepare(args: DataArgs, progress: bool = True) -> dict:
    """Tokenizes every source into `args.dir` and returns the manifest (also written there)."""
    args.validate()
    say = logger.info if progress else logger.debug
    started = time.time()
    prepared_from = _fingerprint_inputs(args)  # also checks that every path exists
    # Loaded before the directory is cleared, since it may be the tokenizer of an earlier prepare.
    tok = load_tokenizer(args.tokenizer, what="data.tokenizer") if args.tokenizer else None
    os.makedirs(args.dir, exist_ok=True)
    # Remove the manifest first: from here until the new one is written the directory is not a
    # valid data dir, and a crash must not leave an old manifest describing half-written shards.
    for name in os.listdir(args.dir):
        if name == MANIFEST or name in TOKENIZER_FILES or SHARD_NAME.match(name):
            os.remove(os.path.join(args.dir, name))

    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".prepare-") as tmp, _progress_bars(progress):
        sources = []
        for i, source in enumerate(args.sources):
            say(f"reading source {i} ({source.path}) ...")
            sources.append(load_source(args, i, tmp))
            say(f"  {len(sources[-1])} records")

        if tok is None:
            say(f"training a sentencepiece BPE tokenizer (vocab_size={args.vocab_size}) ...")
            tok = _train_sentencepiece(_tokenizer_sentences(sources, args.val_fraction), args.vocab_size)
        tokenizer_file = tok.save(args.dir)
        dtype = token_dtype(tok.vocab_size)
        say(f"tokenizer: {tok.kind}, vocab_size={tok.vocab_size}, eos_id={tok.eos_id}, tokens as {dtype}")

        written = []
        for i, ds in enumerate(sources):
            say(f"tokenizing source {i} ({args.sources[i].path}): {len(ds)} records ...")
            entry = _write_source(_tokenize(ds, tok, i, tmp, progress), i, args, dtype, tok.vocab_size)
            shards = len(entry["train_shards"]) + len(entry["val_shards"])
            say(f"  wrote {entry['train_tokens'] + entry['val_tokens']} tokens in {shards} shards "
                f"({entry['documents']} documents; {entry['train_tokens']} train, "
                f"{entry['val_tokens']} val); conditional entropy {entry['conditional_entropy']:.4f} nats")
            written.append(entry)
        entropy_mix = entropy_weights([s["conditional_entropy"] for s in written])
        say("entropy-driven weights (data.mixture=entropy, all sources in): " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(args.source_names(), entropy_mix)))

    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": _hash(prepared_from),
        "prepared_from": prepared_from,
        "tokenizer": {"file": tokenizer_file, "kind": tok.kind},
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "seq_len": args.seq_len,  # informational: any seq_len the shards can hold may be used
        "shard_tokens": args.shard_tokens,
        "sources": written,
        "entropy_weights": entropy_mix,  # BiMix's softmax of the entropies, every source in the mixture
    }
    write_file_atomic(os.path.join(args.dir, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    total = sum(s["train_tokens"] + s["val_tokens"] for s in written)
    shards = sum(len(s["train_shards"]) + len(s["val_shards"]) for s in written)
    say(f"wrote {total} tokens in {shards} shards to {args.dir} in {time.time() - started:.1f}s")
    return manifest



# --------------------------------------------------------------------------------------------
# Fingerprint, manifest, and the all-ranks entry point


def _file_stats(paths: list[str]) -> list[list]:
    stats = []
    for p in sorted(paths):
        st = os.stat(p)
        stats.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return stats


def _fingerprint_inputs(args: DataArgs) -> dict:
    """Everything that decides the prepared tokens. Weights are not in it: they apply at sampling."""
    sources = []
    for i, source in enumerate(args.sources):
        kind, files = resolve_source(i, source.path)
        if kind == "builtin":
            content = hashlib.sha256("\0".join(BUILTIN_CORPORA[source.path]()).encode()).hexdigest()
            sources.append({"path": source.path, "content": content})
            continue
        if kind == "saved":
            files = [f for f in glob.glob(os.path.join(files[0], "**", "*"), recursive=True)
                     if os.path.isfile(f)]
        entry = {"path": source.path, "files": _file_stats(files)}
        if kind == "text":  # how a text file is cut into documents decides its tokens
            entry["split"] = source.split
        sources.append(entry)
    if args.tokenizer is None:
        tokenizer = {"train": "sentencepiece-bpe", "vocab_size": args.vocab_size}
    else:
        path = os.path.expanduser(args.tokenizer)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.tokenizer: no such file or directory: {args.tokenizer!r}")
        # A tokenizer directory may be another data dir: its shards and manifest are not the tokenizer.
        files = ([os.path.join(path, f) for f in os.listdir(path) if f != MANIFEST and not SHARD_NAME.match(f)]
                 if os.path.isdir(path) else [path])
        tokenizer = {"path": args.tokenizer, "files": _file_stats([f for f in files if os.path.isfile(f)])}
    return {
        "format": FORMAT_VERSION,
        "sources": sources,
        "tokenizer": tokenizer,
        "val_fraction": args.val_fraction,
        "text_field": args.text_field,
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fingerprint(args: DataArgs) -> str:
    return _hash(_fingerprint_inputs(args))


def load_manifest(directory: str) -> Optional[dict]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"data.dir: {path} is not valid JSON ({e}); delete {directory}") from e


def _check_matches(manifest: dict, args: DataArgs) -> None:
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"data.dir {args.dir} was prepared in format {manifest.get('format')}, "
                         f"this launcher writes format {FORMAT_VERSION}; delete it or choose another data.dir")
    wanted = _fingerprint_inputs(args)
    if manifest.get("fingerprint") == _hash(wanted):
        return
    had = manifest.get("prepared_from", {})
    changed = sorted(k for k in set(wanted) | set(had) if wanted.get(k) != had.get(k))
    raise ValueError(f"data.dir {args.dir} was prepared from different sources/tokenizer "
                     f"(differs in: {', '.join(changed) or 'fingerprint'}); delete it or choose another data.dir")


def ensure_prepared(args: DataArgs, is_main: bool, barrier: Callable[[], None]) -> dict:
    """Called by every rank: the main rank prepares `args.dir` if it has no manifest, and all
    ranks then return the manifest after checking it was prepared from these arguments.

    Every rank calls `barrier()` exactly once, whatever happens, so that ranks never disagree on
    the number of collectives (one rank returning early while another waits would hang).
    """
    error = None
    if is_main:
        try:
            if load_manifest(args.dir) is None:
                prepare(args)
        except BaseException as e:  # re-raised after the barrier, so the other ranks are released
            error = e
    barrier()
    if error is not None:
        raise error
    manifest = load_manifest(args.dir)
    if manifest is None:
        raise FileNotFoundError(f"data.dir {args.dir} has no {MANIFEST} after the main rank prepared it "
                           "(did it fail, or is data.dir not on a filesystem shared by all nodes?)")
    _check_matches(manifest, args)
    return manifest

