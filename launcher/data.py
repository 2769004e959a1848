"""Token data: text sources -> tokenizer -> uint16/uint32 token shards, and deterministic batches.

Preparation (`prepare`, once, on the main rank) turns every source into flat binary token files:

    <data.dir>/tokenizer.model | tokenizer.json   the tokenizer, so the directory is self-contained
    <data.dir>/{source}_{train|val}_{shard:05d}.bin  token ids (uint16 or uint32), documents
                                                     separated by the tokenizer's EOS id
    <data.dir>/manifest.json                         what was written, and a fingerprint of the
                                                     arguments it was prepared from

Training (`TokenBatches`) memory-maps those files and draws batches as a pure function of
(seed, step, data-parallel rank, micro-batch), so a resumed or re-sharded run sees exactly the
batches it would have seen.
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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

# Nothing in preparation may reach the network (compute nodes have none); `datasets` and
# `transformers` read these when they are first imported, which happens lazily below.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN_PYDOC = "builtin:pydoc"  # CPython's bundled documentation topics: ~120k tokens
BUILTIN_STDLIB = "builtin:stdlib"  # the standard library's own .py sources (tests excluded): ~12 MB

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SHARD_NAME = re.compile(r"^\d+_(train|val)_\d{5}\.bin$")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
# Tokens that conventionally end a document in tokenizer.json files that do not say which one is EOS.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")

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
# The held-out windows are visited in a shuffled order that depends on the data only, never on
# the run's seed, so runs with different seeds are evaluated on the same text.
VAL_ORDER_SEED = 0x5EED


@dataclass
class DataSource:
    path: str  # a file, a directory of files, a glob, a saved `datasets` dataset, builtin:pydoc or builtin:stdlib
    weight: float = 1.0


@dataclass
class DataArgs:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource(BUILTIN_PYDOC)])
    dir: str = "data/pydoc"  # where the token shards and manifest.json live
    tokenizer: Optional[str] = None  # sentencepiece .model, HF tokenizer.json or dir; None: train one
    vocab_size: int = 4096  # size of the sentencepiece model trained when tokenizer is None
    val_fraction: float = 0.05
    seq_len: int = 256
    text_field: str = "text"
    shard_tokens: int = 1 << 27


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


# --------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """One face for a sentencepiece model and a Hugging Face `tokenizers` tokenizer.

    It is built from the serialized model rather than a path so that it pickles into
    `datasets.map` worker processes and so that saving it into the data dir is a plain write.
    """

    def __init__(self, kind: str, blob, eos_token: Optional[str] = None, what: str = "tokenizer"):
        self.kind = kind
        self._blob = blob
        self._eos_token = eos_token
        self._what = what
        if kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=blob)
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
            if self.eos_id < 0:
                raise ValueError(f"{what}: the sentencepiece model has no EOS piece (eos_id is -1); "
                                 "train it with an eos_id >= 0")
        elif kind == "huggingface":
            import tokenizers

            self._hf = tokenizers.Tokenizer.from_str(blob)
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            names = [eos_token] if eos_token else list(EOS_CANDIDATES)
            ids = [self._hf.token_to_id(n) for n in names]
            found = [(n, i) for n, i in zip(names, ids) if i is not None]
            if not found:
                raise ValueError(f"{what}: the tokenizer has no end-of-sequence token (looked for "
                                 f"{names}); set eos_token in a tokenizer_config.json next to it")
            self._eos_token, self.eos_id = found[0]
        else:
            raise ValueError(f"{what}: unknown tokenizer kind {kind!r}")
        # Some tokenizer.json files place added tokens past the declared vocab size.
        self.vocab_size = max(self.vocab_size, self.eos_id + 1)

    def __getstate__(self):
        return (self.kind, self._blob, self._eos_token, self._what)

    def __setstate__(self, state):
        self.__init__(*state)

    @property
    def file_name(self) -> str:
        return "tokenizer.model" if self.kind == "sentencepiece" else "tokenizer.json"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], threads: int = 0) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self._sp.encode(texts, out_type=int, num_threads=threads or (os.cpu_count() or 1))
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def save(self, directory: str) -> str:
        """Writes the tokenizer into `directory` (atomically) and returns its file name."""
        if self.kind == "sentencepiece":
            _write_atomic(os.path.join(directory, self.file_name), self._blob)
        else:
            _write_atomic(os.path.join(directory, self.file_name), self._blob.encode())
            # tokenizer.json does not say which token is EOS; this file does, for load_tokenizer.
            config = json.dumps({"eos_token": self._eos_token}, indent=2) + "\n"
            _write_atomic(os.path.join(directory, "tokenizer_config.json"), config.encode())
        return self.file_name


def load_tokenizer(path_or_dir: str, what: str = "tokenizer") -> Tokenizer:
    """Loads a sentencepiece `.model`, a `tokenizer.json`, or a directory holding one of them or a
    `transformers` tokenizer (a data dir made by `prepare` is such a directory)."""
    path = os.path.expanduser(path_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: no such file or directory: {path_or_dir!r}")
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), what)
        models = sorted(glob.glob(os.path.join(path, "*.model")))  # e.g. spiece.model
        if models:
            return load_tokenizer(models[0], what)
        return _load_transformers_tokenizer(path, what)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            blob = f.read()
        return Tokenizer("huggingface", blob, _configured_eos(os.path.dirname(path)), what)
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return Tokenizer("sentencepiece", blob, what=what)
    except RuntimeError as e:  # sentencepiece's "cannot parse model" comes as RuntimeError
        raise ValueError(f"{what}: {path_or_dir!r} is neither a sentencepiece model nor a "
                         f"tokenizer.json ({e})") from e


def _configured_eos(directory: str) -> Optional[str]:
    """The eos_token named by a transformers-style config next to a tokenizer.json, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _load_transformers_tokenizer(path: str, what: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: {path!r} holds no tokenizer.model, tokenizer.json or "
                         f"transformers tokenizer ({e})") from e
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{what}: the transformers tokenizer in {path!r} has no fast "
                         "(tokenizer.json) form; save it with a fast tokenizer first")
    return Tokenizer("huggingface", tok.backend_tokenizer.to_str(), tok.eos_token, what)


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


# --------------------------------------------------------------------------------------------
# Sources


def _datasets():
    import datasets

    return datasets


def _source_key(i: int) -> str:
    return f"data.sources[{i}].path"


def _resolve_source(i: int, path: str) -> tuple[str, list[str]]:
    """Says how to read a source: ("builtin", []), ("saved", [dir]) or (builder, files)."""
    key = _source_key(i)
    if path in BUILTIN_CORPORA:
        return "builtin", []
    if path.startswith("builtin:"):
        raise ValueError(f"{key}: unknown builtin corpus {path!r} (known: {', '.join(BUILTIN_CORPORA)})")
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if any(os.path.isfile(os.path.join(expanded, m)) for m in ("state.json", "dataset_dict.json")):
            return "saved", [expanded]
        files = [f for f in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
                 if os.path.isfile(f) and _suffix(f) in TEXT_SUFFIXES]
        if not files:
            raise ValueError(f"{key}: directory {path!r} holds no {'/'.join(TEXT_SUFFIXES)} files "
                             "and is not a saved `datasets` dataset")
    elif os.path.isfile(expanded):
        files = [expanded]
    elif glob.has_magic(expanded):
        files = [f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f)]
        if not files:
            raise FileNotFoundError(f"{key}: the pattern {path!r} matches no files")
    else:
        raise FileNotFoundError(f"{key}: no such file or directory: {path!r}")
    files.sort()
    unknown = sorted({_suffix(f) or "(none)" for f in files if _suffix(f) not in TEXT_SUFFIXES})
    if unknown:
        raise ValueError(f"{key}: unsupported file type {', '.join(unknown)} in {path!r} "
                         f"(supported: {', '.join(TEXT_SUFFIXES)})")
    builders = sorted({TEXT_SUFFIXES[_suffix(f)] for f in files})
    if len(builders) > 1:
        raise ValueError(f"{key}: {path!r} mixes file types ({', '.join(builders)}); "
                         "give each type its own source")
    return builders[0], files


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _stdlib_documents() -> list[str]:
    """One document per module source of the running Python's standard library."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if not skip & set(os.path.relpath(f, root).split(os.sep)))
    documents = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as handle:
            documents.append(handle.read())
    return documents


# Corpora that ship with Python itself: they need no download and no path.
BUILTIN_CORPORA = {BUILTIN_PYDOC: _pydoc_documents, BUILTIN_STDLIB: _stdlib_documents}


def _load_source(args: DataArgs, i: int, cache_dir: str):
    """The source as a `datasets.Dataset` with one string column, "text"."""
    datasets = _datasets()
    path = args.sources[i].path
    kind, files = _resolve_source(i, path)
    if kind == "builtin":
        return datasets.Dataset.from_dict({"text": BUILTIN_CORPORA[path]()})
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(files[0])
        else:
            extra = {"sample_by": "paragraph"} if kind == "text" else {}
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir,
                                       **extra)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as e:
        raise ValueError(f"{_source_key(i)}: could not read {path!r}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"{_source_key(i)}: the saved DatasetDict {path!r} has splits "
                             f"{sorted(ds)} but no 'train' split to read")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    column = "text" if kind == "text" else args.text_field
    if column not in ds.column_names:
        raise ValueError(f"data.text_field: column {column!r} not found in data.sources[{i}] "
                         f"({path!r}); columns found: {ds.column_names}")
    feature = ds.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"data.text_field: column {column!r} of data.sources[{i}] ({path!r}) "
                         f"holds {feature}, not text")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def _texts(ds, column: str = "text", batch_size: int = 1000) -> Iterator[list]:
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        yield batch.column(column).to_pylist()


def _is_document(text) -> bool:
    return bool(text) and not text.isspace()


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
        for batch in _texts(ds.select(range(n_train))):
            for text in batch:
                index += 1
                if (index - 1) % stride or not _is_document(text):
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
    datasets = _datasets()
    eos = tok.eos_id
    num_proc = None
    if ds.data.nbytes > PARALLEL_MAP_BYTES and (os.cpu_count() or 1) > 1:
        num_proc = min(os.cpu_count(), 16)
    # Worker processes each take a core; the tokenizer's own threads would only oversubscribe.
    threads = 1 if num_proc else 0

    def encode(batch):
        ids = tok.encode_batch([t for t in batch["text"] if _is_document(t)], threads)
        for doc in ids:
            doc.append(eos)
        return {"ids": ids}

    value = "int32" if tok.vocab_size < 1 << 31 else "int64"
    return ds.map(
        encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
        features=datasets.Features({"ids": datasets.List(datasets.Value(value))}),
        cache_file_name=os.path.join(cache_dir, f"tokens_{i}.arrow"),
        load_from_cache_file=False, new_fingerprint=f"tokens-{i}-{os.getpid()}-{time.time_ns()}",
        desc=f"tokenizing source {i}" if progress else None,
    )


def _write_source(tokens, i: int, args: DataArgs, dtype: np.dtype) -> dict:
    import pyarrow.compute as pc

    what = f"data.sources[{i}] ({args.sources[i].path!r})"
    tables = tokens.with_format("arrow")
    doc_tokens = np.concatenate(
        [pc.list_value_length(b.column("ids")).to_numpy(zero_copy_only=False)
         for b in tables.iter(batch_size=100_000)] or [np.zeros(0, np.int64)])
    if len(doc_tokens) == 0:
        raise ValueError(f"{what} holds no (non-blank) documents")
    n_train = _train_token_count(doc_tokens, args.val_fraction, args.seq_len + 1, what)
    train = _ShardWriter(args.dir, f"{i}_train", dtype, args.shard_tokens)
    val = _ShardWriter(args.dir, f"{i}_val", dtype, args.shard_tokens)
    written = 0
    for batch in tables.iter(batch_size=10_000):
        flat = pc.list_flatten(batch.column("ids")).to_numpy(zero_copy_only=False)
        head = flat[: max(0, n_train - written)]
        train.write(head)
        val.write(flat[len(head):])
        written += len(flat)
    ends = np.cumsum(doc_tokens)
    return {
        "path": args.sources[i].path,
        "weight": args.sources[i].weight,
        "documents": len(doc_tokens),
        # A document cut at the split counts in both.
        "train_documents": int(np.searchsorted(ends, n_train, side="left")) + 1,
        "val_documents": len(doc_tokens) - int(np.searchsorted(ends, n_train, side="right")),
        "train_tokens": n_train,
        "val_tokens": written - n_train,
        "train_shards": train.close(),
        "val_shards": val.close(),
    }


@contextmanager
def _progress_bars(enabled: bool):
    datasets = _datasets()
    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _check_args(args: DataArgs) -> None:
    if not args.sources:
        raise ValueError("data.sources: no sources given")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"data.val_fraction={args.val_fraction}: must be between 0 and 1 (exclusive)")
    if args.seq_len < 1:
        raise ValueError(f"data.seq_len={args.seq_len}: must be positive")
    if args.shard_tokens < args.seq_len + 1:
        raise ValueError(f"data.shard_tokens={args.shard_tokens}: must be at least data.seq_len+1 "
                         f"({args.seq_len + 1}), since a window never spans two shards")
    if args.tokenizer is None and args.vocab_size < 1:
        raise ValueError(f"data.vocab_size={args.vocab_size}: must be positive")


def prepare(args: DataArgs, progress: bool = True) -> dict:
    """Tokenizes every source into `args.dir` and returns the manifest (also written there)."""
    _check_args(args)
    say = print if progress else (lambda *a, **k: None)
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
            say(f"reading source {i} ({source.path}) ...", flush=True)
            sources.append(_load_source(args, i, tmp))
            say(f"  {len(sources[-1])} records", flush=True)

        if tok is None:
            say(f"training a sentencepiece BPE tokenizer (vocab_size={args.vocab_size}) ...", flush=True)
            tok = _train_sentencepiece(_tokenizer_sentences(sources, args.val_fraction), args.vocab_size)
        tokenizer_file = tok.save(args.dir)
        dtype = token_dtype(tok.vocab_size)
        say(f"tokenizer: {tok.kind}, vocab_size={tok.vocab_size}, eos_id={tok.eos_id}, tokens as {dtype}",
            flush=True)

        written = []
        for i, ds in enumerate(sources):
            say(f"tokenizing source {i} ({args.sources[i].path}): {len(ds)} records ...", flush=True)
            entry = _write_source(_tokenize(ds, tok, i, tmp, progress), i, args, dtype)
            shards = len(entry["train_shards"]) + len(entry["val_shards"])
            say(f"  wrote {entry['train_tokens'] + entry['val_tokens']} tokens in {shards} shards "
                f"({entry['documents']} documents; {entry['train_tokens']} train, "
                f"{entry['val_tokens']} val)", flush=True)
            written.append(entry)

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
    }
    _write_atomic(os.path.join(args.dir, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    total = sum(s["train_tokens"] + s["val_tokens"] for s in written)
    shards = sum(len(s["train_shards"]) + len(s["val_shards"]) for s in written)
    say(f"wrote {total} tokens in {shards} shards to {args.dir} in {time.time() - started:.1f}s", flush=True)
    return manifest


def _write_atomic(path: str, data: bytes) -> None:
    # A plain open() (not mkstemp) so the file gets the usual umask permissions, readable by
    # whoever else reads the data dir.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        kind, files = _resolve_source(i, source.path)
        if kind == "builtin":
            content = hashlib.sha256("\0".join(BUILTIN_CORPORA[source.path]()).encode()).hexdigest()
            sources.append({"path": source.path, "content": content})
            continue
        if kind == "saved":
            files = [f for f in glob.glob(os.path.join(files[0], "**", "*"), recursive=True)
                     if os.path.isfile(f)]
        sources.append({"path": source.path, "files": _file_stats(files)})
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


# --------------------------------------------------------------------------------------------
# Batches


class _Split:
    """The memory-mapped shards of one split of one source."""

    def __init__(self, data_dir: str, shards: list[dict], dtype: np.dtype, window: int):
        self.window = window
        self.maps = []
        for shard in shards:
            path = os.path.join(data_dir, shard["file"])
            expected = shard["tokens"] * dtype.itemsize
            size = os.path.getsize(path) if os.path.exists(path) else None
            if size != expected:
                raise ValueError(f"data.dir: shard {path} has {size} bytes, the manifest says "
                                 f"{expected}; the data dir is damaged, delete it and prepare again")
            self.maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
        lengths = np.array([m.shape[0] for m in self.maps], dtype=np.int64)
        self.longest = int(lengths.max()) if len(lengths) else 0
        # Train windows may start anywhere a window fits; val windows tile the shards.
        self.starts = np.cumsum(np.maximum(lengths - window + 1, 0))
        self.tiles = np.cumsum(lengths // window)

    @property
    def num_starts(self) -> int:
        return int(self.starts[-1]) if len(self.starts) else 0

    @property
    def num_tiles(self) -> int:
        return int(self.tiles[-1]) if len(self.tiles) else 0

    def _slice(self, cumulative: np.ndarray, k: int, stride: int) -> np.ndarray:
        shard = int(np.searchsorted(cumulative, k, side="right"))
        offset = (k - (int(cumulative[shard - 1]) if shard else 0)) * stride
        return self.maps[shard][offset:offset + self.window]

    def window_at(self, k: int) -> np.ndarray:
        return self._slice(self.starts, k, 1)

    def tile(self, k: int) -> np.ndarray:
        return self._slice(self.tiles, k, self.window)


def _normalised_weights(weights: list[float], sources: int) -> np.ndarray:
    if len(weights) != sources:
        raise ValueError(f"data.sources: {len(weights)} weights given for a data.dir prepared from "
                         f"{sources} sources")
    w = np.asarray(weights, dtype=np.float64)
    for i, x in enumerate(w):
        if not np.isfinite(x) or x < 0:
            raise ValueError(f"data.sources[{i}].weight={weights[i]}: must be a finite number >= 0")
    if w.sum() <= 0:
        raise ValueError("data.sources[*].weight: at least one weight must be positive")
    return w / w.sum()


def _as_tensors(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = np.stack(rows).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])), torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))


class TokenBatches:
    """Deterministic (x, y) batches of `seq_len` tokens from a prepared data dir."""

    def __init__(self, manifest: dict, data_dir: str, weights: list[float], seq_len: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len}: must be positive")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.manifest, self.seq_len, self.seed = manifest, seq_len, int(seed)
        self.sources = manifest["sources"]
        self.probs = _normalised_weights(weights, len(self.sources))
        dtype = np.dtype(manifest["dtype"])
        window = seq_len + 1
        self._train = [_Split(data_dir, s["train_shards"], dtype, window) for s in self.sources]
        self._val = [_Split(data_dir, s["val_shards"], dtype, window) for s in self.sources]
        for i, s in enumerate(self.sources):
            if self.probs[i] == 0:
                continue  # never sampled, so its size does not matter
            for name, split in (("train", self._train[i]), ("val", self._val[i])):
                if split.num_starts == 0:
                    raise ValueError(f"data.seq_len={seq_len} is too large for data.sources[{i}] "
                                     f"({s['path']!r}): its longest {name} shard has {split.longest} "
                                     f"tokens, a window needs {window}")
        self._num_starts = np.array([t.num_starts for t in self._train], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    @property
    def tokens_per_source(self) -> list[dict]:
        return [{"path": s["path"], "weight": float(p), "train_tokens": s["train_tokens"],
                 "val_tokens": s["val_tokens"]} for s, p in zip(self.sources, self.probs)]

    def train_batch(self, step: int, dp_rank: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows, a function of (seed, step, dp_rank, micro) only."""
        if min(step, dp_rank, micro) < 0 or batch_size < 1:
            raise ValueError(f"train_batch(step={step}, dp_rank={dp_rank}, micro={micro}, "
                             f"batch_size={batch_size}): indices must be >= 0 and batch_size >= 1")
        rng = np.random.default_rng([self.seed, step, dp_rank, micro])
        sources = rng.choice(len(self.probs), size=batch_size, p=self.probs)
        starts = rng.integers(0, self._num_starts[sources])
        return _as_tensors([self._train[s].window_at(int(k)) for s, k in zip(sources, starts)])

    def _val_order(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` windows of the held-out sequence, as (source, tile index) arrays.

        Each source's tiles are visited in a fixed shuffled order (wrapping around when used up);
        the sources are merged so that source s supplies its k-th window at "time" (k + 1/2) / p_s,
        which interleaves them in proportion to weight. The sequence depends only on the data and
        the weights, so any prefix of it is the same whenever and on whichever rank it is built.
        """
        active = np.flatnonzero(self.probs > 0)
        times, owners, nth = [], [], []
        for s in active:
            # Enough entries per source that the merged prefix of length `count` never runs short.
            k = np.arange(math.ceil(count * self.probs[s] + len(active) / 2 + 1))
            times.append((k + 0.5) / self.probs[s])
            owners.append(np.full(len(k), s))
            nth.append(k)
        times, owners, nth = (np.concatenate(a) for a in (times, owners, nth))
        order = np.lexsort((owners, times))[:count]  # by time, ties by source index
        owners, nth = owners[order], nth[order]
        tiles = np.empty(count, dtype=np.int64)
        for s in active:
            mine = owners == s
            n = self._val[s].num_tiles
            shuffled = np.random.default_rng([VAL_ORDER_SEED, int(s)]).permutation(n)
            tiles[mine] = shuffled[nth[mine] % n]
        return owners, tiles

    def val_batches(self, dp_rank: int, dp_size: int, num_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out set: `dp_size * num_batches * batch_size` windows, the same on every call;
        rank r takes every dp_size-th of them starting at r, so ranks get disjoint windows (while
        there are enough) and exactly `num_batches` batches each."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size or num_batches < 0 or batch_size < 1:
            raise ValueError(f"val_batches(dp_rank={dp_rank}, dp_size={dp_size}, num_batches="
                             f"{num_batches}, batch_size={batch_size}): invalid arguments")
        rows = num_batches * batch_size
        owners, tiles = self._val_order(rows * dp_size)
        mine = slice(dp_rank, rows * dp_size, dp_size)
        windows = [self._val[s].tile(int(k)) for s, k in zip(owners[mine], tiles[mine])]
        return [_as_tensors(windows[b * batch_size:(b + 1) * batch_size]) for b in range(num_batches)]

    def val_windows(self) -> int:
        """How many distinct held-out windows the sampled sources have."""
        return sum(v.num_tiles for v, p in zip(self._val, self.probs) if p > 0)
