"""What `data.sources` may name and how each is found: text to tokenize (files, folders, globs,
saved `datasets` datasets, the corpora that ship with Python) and corpora tokenized elsewhere
(nanoGPT's flat token files, Megatron/GPT-NeoX indexed datasets), read as they are."""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from core.config import ConfigError, FilePath, need
from launcher.data.mixture import MIXTURES
from launcher.data.text import check_split

# Nothing in preparation may reach the network (compute nodes have none); `datasets` and
# `transformers` read these when they are first imported, which happens lazily.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN_PYDOC = "builtin:pydoc"  # CPython's bundled documentation topics: ~120k tokens
BUILTIN_STDLIB = "builtin:stdlib"  # the standard library's own .py sources (tests excluded): ~12 MB
BUILTIN_ARITHMETIC = "builtin:arithmetic"  # generated sums and products, the same on every machine: ~1.3 MB
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
TOKEN_DTYPES = ("uint16", "uint32")  # what a nanoGPT-style flat file may hold
Format = Literal["auto", "text", "nanogpt", "megatron"]


SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DataSource:
    path: FilePath  # a file, a directory of files, a glob, a saved `datasets` dataset, or builtin:pydoc|stdlib|arithmetic
    weight: float = 1.0  # data.mixture=weights: its share; natural/entropy: > 0 in the mixture, 0 held out only
    name: Optional[str] = None  # in per-source losses; None: from the path (builtin:pydoc -> pydoc, a/b.jsonl -> b)
    split: str = "blank-line"  # .txt files: blank-line | line | whole-file | regex:PATTERN (launcher/data/text.py)
    # How the source is stored: text to tokenize; nanogpt: flat token files (a folder with train.bin and
    # val.bin, or one .bin); megatron: an indexed dataset (the path prefix of its .bin and .idx); auto: from the path.
    format: Format = "auto"
    dtype: Optional[str] = None  # nanogpt files: uint16 (nanoGPT's, the default) or uint32

    def default_name(self) -> str:
        if self.path.startswith("builtin:"):
            return self.path.split(":", 1)[1]
        parts = [p for p in os.path.normpath(os.path.expanduser(self.path)).split(os.sep)
                 if p and not glob.has_magic(p)]
        base = os.path.splitext(parts[-1])[0] if parts else "source"
        if base in ("train", "val") and len(parts) > 1:  # a nanoGPT folder's train.bin: the folder names it
            base = parts[-2]
        return re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("._-") or "source"


@dataclass
class DataArgs:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource(BUILTIN_PYDOC)])
    dir: FilePath = "data/pydoc"  # where the token shards and manifest.json live
    # A HF tokenizer.json (GPT-2's, say), a folder holding one or a transformers tokenizer, or a
    # sentencepiece .model; None: a byte-level BPE of vocab_size is trained on the sources' text.
    # Token-file sources need the tokenizer they were made with.
    tokenizer: Optional[FilePath] = None
    vocab_size: int = 4096  # entries of the byte-level BPE trained when tokenizer is None
    val_fraction: float = 0.05  # held out of each text source (its last documents), and of a flat file without val.bin
    seq_len: int = 256
    text_field: str = "text"
    prefetch: bool = True  # build the next step's batches in a background thread while this one runs
    mixture: str = "weights"  # weights | natural (by train tokens) | entropy (BiMix): launcher/data/mixture.py

    def validate(self) -> None:
        need(len(self.sources) > 0, "data.sources: at least one source is needed")
        for i, src in enumerate(self.sources):
            need(src.weight >= 0, f"data.sources[{i}].weight: must be >= 0, got {src.weight}")
        need(any(src.weight > 0 for src in self.sources), "data.sources: at least one weight must be positive")
        for i, src in enumerate(self.sources):
            need(src.name is None or bool(SOURCE_NAME.match(src.name)),
                 f"data.sources[{i}].name: {src.name!r} must be letters, digits, '_', '.', '-'")
        for i, src in enumerate(self.sources):
            try:
                check_split(src.split)
            except ValueError as e:
                raise ConfigError(f"data.sources[{i}].split: {e}") from None
        names = [src.name for src in self.sources if src.name is not None]
        need(len(names) == len(set(names)), f"data.sources[*].name: names must differ, got {names}")
        need(self.mixture in MIXTURES, f"data.mixture: must be one of {', '.join(MIXTURES)}, got {self.mixture!r}")
        need(0.0 < self.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        need(self.seq_len > 0, f"data.seq_len: must be positive, got {self.seq_len}")
        need(self.tokenizer is not None or self.vocab_size >= 257,
             f"data.vocab_size={self.vocab_size}: the byte-level BPE trained when data.tokenizer is unset needs at "
             f"least 257 entries (256 bytes and the end-of-text token)")
        for i, src in enumerate(self.sources):
            need(src.dtype is None or src.dtype in TOKEN_DTYPES,
                 f"data.sources[{i}].dtype: must be one of {', '.join(TOKEN_DTYPES)}, got {src.dtype!r}")


    def source_names(self) -> list[str]:
        """Each source's name in per-source losses: its own, or one from its path (made unique)."""
        taken = {src.name for src in self.sources if src.name is not None}
        names = []
        for i, src in enumerate(self.sources):
            name = src.name
            if name is None:
                base, k = src.default_name(), i
                name = base
                while name in taken or name in names:
                    name, k = f"{base}_{k}", k + 1
            names.append(name)
        return names


def datasets_module():
    import datasets

    return datasets


def source_key(i: int) -> str:
    return f"data.sources[{i}].path"


# ---------------------------------------------------------------------------------------------
# what a path holds


def resolve_source(i: int, source: DataSource) -> tuple[str, list[str]]:
    """How to read a source: ("builtin", []), ("saved", [dir]), ("nanogpt", [train.bin, val.bin?]),
    ("megatron", [prefix]) or (a text kind: text | jsonl | json | parquet, its files in name order).
    Errors (ValueError, FileNotFoundError) are one line naming the key."""
    key, path = source_key(i), source.path
    if path in BUILTIN_CORPORA:
        need_format(i, source, "text")
        return "builtin", []
    if path.startswith("builtin:"):
        raise ValueError(f"{key}: unknown builtin corpus {path!r} (known: {', '.join(BUILTIN_CORPORA)})")
    expanded = os.path.expanduser(path)
    tokens = _token_files(expanded, source.format)
    if tokens is not None:
        kind, files = tokens
        if source.split != DataSource.split:
            raise ValueError(f"data.sources[{i}].split: applies to .txt files; {path!r} holds {kind} token files")
        return kind, files
    if source.format in ("nanogpt", "megatron"):
        want = {"nanogpt": "a folder with train.bin (and val.bin) or a .bin file",
                "megatron": "the prefix of an indexed dataset's .bin and .idx"}[source.format]
        if not os.path.exists(expanded) and not glob.glob(expanded + ".*"):
            raise FileNotFoundError(f"{key}: no such file or directory: {path!r}")
        raise ValueError(f"{key}: format {source.format} needs {want}; {path!r} is not one")
    if source.dtype is not None:
        raise ValueError(f"data.sources[{i}].dtype: applies to nanogpt token files; {path!r} is text")
    if os.path.isdir(expanded):
        if any(os.path.isfile(os.path.join(expanded, m)) for m in ("state.json", "dataset_dict.json")):
            return "saved", [expanded]
        files = [f for f in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
                 if os.path.isfile(f) and _suffix(f) in TEXT_SUFFIXES]
        if not files:
            raise ValueError(f"{key}: directory {path!r} holds no {'/'.join(TEXT_SUFFIXES)} files, token files "
                             "or saved `datasets` dataset")
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
                         f"(supported: {', '.join(TEXT_SUFFIXES)}, .bin token files)")
    kinds = sorted({TEXT_SUFFIXES[_suffix(f)] for f in files})
    if len(kinds) > 1:
        raise ValueError(f"{key}: {path!r} mixes file types ({', '.join(kinds)}); give each type its own source")
    if kinds[0] != "text" and source.split != DataSource.split:
        raise ValueError(f"data.sources[{i}].split: applies to .txt files; {path!r} is read as {kinds[0]}")
    return kinds[0], files


def need_format(i: int, source: DataSource, kind: str) -> None:
    if source.format not in ("auto", kind):
        raise ValueError(f"data.sources[{i}].format: {source.path!r} is {kind}, not {source.format}")


def _token_files(path: str, format: str) -> Optional[tuple[str, list[str]]]:
    """("megatron", [prefix]) or ("nanogpt", [train.bin, val.bin?]) when the path holds token files
    (as `format` asks, or as it looks under auto), else None."""
    if format in ("auto", "megatron"):
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        if os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin"):
            return "megatron", [prefix]
        if format == "megatron" or path.endswith(".idx"):
            return None
    if format in ("auto", "nanogpt"):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "train.bin")):
            val = os.path.join(path, "val.bin")
            return "nanogpt", [os.path.join(path, "train.bin"), *([val] if os.path.isfile(val) else [])]
        if os.path.isfile(path) and path.endswith(".bin"):
            val = os.path.join(os.path.dirname(path), "val.bin")
            paired = os.path.basename(path) == "train.bin" and os.path.isfile(val)
            return "nanogpt", [path, *([val] if paired else [])]
    return None


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


# ---------------------------------------------------------------------------------------------
# the corpora that ship with Python


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


def _arithmetic_documents(count: int = 3000, lines: int = 20) -> list[str]:
    """Integer arithmetic, `a op b = c`, from a fixed seed: a third kind of text beside prose and
    code for mixtures (rigid format, digits nearly random, the results learnable)."""
    import random

    rng = random.Random(0)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    documents = []
    for _ in range(count):
        rows = []
        for _ in range(lines):
            a, b, op = rng.randrange(10_000), rng.randrange(10_000), rng.choice("+-*")
            rows.append(f"{a} {op} {b} = {ops[op](a, b)}")
        documents.append("\n".join(rows))
    return documents


# Corpora that need no download and no path: two ship with Python itself, one is generated.
BUILTIN_CORPORA = {BUILTIN_PYDOC: _pydoc_documents, BUILTIN_STDLIB: _stdlib_documents,
                   BUILTIN_ARITHMETIC: _arithmetic_documents}


def is_document(text) -> bool:
    return isinstance(text, str) and bool(text) and not text.isspace()
