"""Text sources: what `data.sources` may name (files, folders, globs, saved `datasets` datasets,
the corpora that ship with Python) and how each is read into a `datasets.Dataset` of text."""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional

from core.config import ConfigError, FilePath, need
from launcher.data.mixture import MIXTURES
from launcher.data.text import check_split, text_pieces

# Nothing in preparation may reach the network (compute nodes have none); `datasets` and
# `transformers` read these when they are first imported, which happens lazily below.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BUILTIN_PYDOC = "builtin:pydoc"  # CPython's bundled documentation topics: ~120k tokens
BUILTIN_STDLIB = "builtin:stdlib"  # the standard library's own .py sources (tests excluded): ~12 MB
BUILTIN_ARITHMETIC = "builtin:arithmetic"  # generated sums and products, the same on every machine: ~1.3 MB
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TEXT_WRITER_BATCH = 64  # pieces of up to 64k characters per Arrow write: a few MB in memory at once


SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class DataSource:
    path: FilePath  # a file, a directory of files, a glob, a saved `datasets` dataset, or builtin:pydoc|stdlib|arithmetic
    weight: float = 1.0  # data.mixture=weights: its share; natural/entropy: > 0 in the mixture, 0 held out only
    name: Optional[str] = None  # in per-source losses; None: from the path (builtin:pydoc -> pydoc, a/b.jsonl -> b)
    split: str = "blank-line"  # .txt files: blank-line | line | whole-file | regex:PATTERN (launcher/data/text.py)

    def default_name(self) -> str:
        if self.path.startswith("builtin:"):
            return self.path.split(":", 1)[1]
        parts = [p for p in os.path.normpath(os.path.expanduser(self.path)).split(os.sep)
                 if p and not glob.has_magic(p)]
        base = os.path.splitext(parts[-1])[0] if parts else "source"
        return re.sub(r"[^A-Za-z0-9_.-]", "_", base).lstrip("._-") or "source"


@dataclass
class DataArgs:
    sources: list[DataSource] = field(default_factory=lambda: [DataSource(BUILTIN_PYDOC)])
    dir: FilePath = "data/pydoc"  # where the token shards and manifest.json live
    tokenizer: Optional[FilePath] = None  # sentencepiece .model, HF tokenizer.json or dir; None: train one
    vocab_size: int = 4096  # size of the sentencepiece model trained when tokenizer is None
    val_fraction: float = 0.05
    seq_len: int = 256
    text_field: str = "text"
    shard_tokens: int = 1 << 27
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
        need(self.shard_tokens >= self.seq_len + 1,
             f"data.shard_tokens={self.shard_tokens}: must be at least data.seq_len+1 ({self.seq_len + 1}), "
             f"since a window never spans two shards")
        need(self.tokenizer is not None or self.vocab_size >= 1, f"data.vocab_size: must be positive, got {self.vocab_size}")


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


def _source_key(i: int) -> str:
    return f"data.sources[{i}].path"


def resolve_source(i: int, path: str) -> tuple[str, list[str]]:
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


def load_source(args: DataArgs, i: int, cache_dir: str):
    """The source as a `datasets.Dataset` with a string column "text" (and for .txt files a bool
    column "last": the record ends its document; without it every record is a document)."""
    datasets = datasets_module()
    path = args.sources[i].path
    kind, files = resolve_source(i, path)
    if kind != "text" and args.sources[i].split != DataSource.split:
        raise ValueError(f"data.sources[{i}].split: applies to .txt files; {path!r} is read as {kind}")
    if kind == "builtin":
        return datasets.Dataset.from_dict({"text": BUILTIN_CORPORA[path]()})
    try:
        if kind == "saved":
            ds = datasets.load_from_disk(files[0])
        elif kind == "text":  # streamed in pieces, written to Arrow on disk as they come: bounded memory
            return datasets.Dataset.from_generator(
                text_pieces, gen_kwargs={"files": files, "split": args.sources[i].split}, cache_dir=cache_dir,
                features=datasets.Features({"text": datasets.Value("string"), "last": datasets.Value("bool")}),
                writer_batch_size=TEXT_WRITER_BATCH)
        else:
            ds = datasets.load_dataset(kind, data_files=files, split="train", cache_dir=cache_dir)
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


def texts(ds, column: str = "text", batch_size: int = 1000) -> Iterator[list]:
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        yield batch.column(column).to_pylist()


def is_document(text) -> bool:
    return bool(text) and not text.isspace()

