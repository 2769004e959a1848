"""Preparing a data dir, once, before training: every source -> token ids -> manifest.json.

    <data.dir>/tokenizer.json (+ tokenizer_config.json)   the tokenizer, so the directory is self-contained
    <data.dir>/{source}_{unit:05d}.bin                      a text source's token ids (uint16 or uint32),
                                                            documents separated by the tokenizer's EOS id
    <data.dir>/manifest.json                                each source's train and held-out (val) token
                                                            ranges, and a fingerprint of what it was prepared from

Text is cut into units of whole documents (launcher/data/units.py) that `processes` worker
processes tokenize at once, with progress lines (documents, tokens, rate, ETA). A run that is killed
keeps its finished units (their records in <data.dir>/.prepare/) and the next run redoes only the
rest. Corpora tokenized elsewhere (launcher/data/tokenized.py) are read where they lie; their ids
are checked against the tokenizer, in parallel too. The held-out split follows launcher/data/split.py.
"""
from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numpy as np

from core.files import PARTIAL, write_file_atomic
from core.log import logger
from core.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer, train_byte_level_bpe
from launcher.data.mixture import BigramCounts, entropy_weights
from launcher.data.sources import BUILTIN_CORPORA, DataArgs, resolve_source
from launcher.data.split import documents_split, train_tokens
from launcher.data.tokenized import TokenSource, open_shard, open_token_source
from launcher.data.units import (
    Unit,
    ends_path,
    read_record,
    scan_unit,
    scan_units,
    text_units,
    token_file,
    tokenize_unit,
    unit_documents,
)

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
STATE = ".prepare"  # the plan and each finished unit's record, while a preparation is under way
UNIT_FILE = re.compile(r"^\d+_\d{5}\.bin$")
OLD_SHARD = re.compile(r"^\d+_(train|val)_\d{5}\.bin$")  # format 1's
UNIT_MB = 64.0  # the largest unit of text, in MB (lawa-prepare --unit-mb)
# The BPE trainer's time and memory grow with its text; tens of MB are plenty for the vocab sizes
# used here, so it learns from evenly spaced units of each source's train part, up to this much.
TOKENIZER_TRAIN_CHARS = 50_000_000
ENTROPY_TOKENS = 1 << 26  # train tokens per source that the conditional entropy is counted over (evenly spaced blocks)
ENTROPY_BLOCK = 1 << 20
PROGRESS_S = 10.0  # seconds between progress lines


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of this size."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def default_processes() -> int:
    """The cores this process may run on (Slurm's --cpus-per-task binds them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------
# the state of a preparation under way


class State:
    """<data.dir>/.prepare: the plan (fingerprint and units) and each finished unit's record."""

    def __init__(self, data_dir: str):
        self.data_dir, self.path = data_dir, os.path.join(data_dir, STATE)
        self.plan_path = os.path.join(self.path, "plan.json")

    def read_plan(self) -> Optional[dict]:
        try:
            with open(self.plan_path) as f:
                return json.load(f)
        except (FileNotFoundError, ValueError):
            return None

    def start(self, plan: dict) -> int:
        """Keeps the finished units of an interrupted preparation of the same plan (returns how many),
        else clears what another one left. Files a killed worker was writing go either way."""
        if self.read_plan() == plan:
            for name in os.listdir(self.data_dir):
                if PARTIAL.match(name):
                    os.remove(os.path.join(self.data_dir, name))
            return sum(read_record(self.path, Unit(**u)) is not None for u in plan["units"])
        self.clear()
        os.makedirs(self.path)
        write_file_atomic(self.plan_path, json.dumps(plan) + "\n")
        return 0

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for name in os.listdir(self.data_dir):
            if UNIT_FILE.match(name) or PARTIAL.match(name):
                os.remove(os.path.join(self.data_dir, name))

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.path, "tokenizer")


# ---------------------------------------------------------------------------------------------
# preparing


def prepare(args: DataArgs, progress: bool = True, processes: Optional[int] = None,
            unit_mb: float = UNIT_MB) -> dict:
    """Prepares `args.dir` and returns its manifest (also written there). Resumes an interrupted
    preparation of the same sources; errors are one line naming the key or file."""
    args.validate()
    say = logger.info if progress else logger.debug
    started = time.time()
    prepared_from = _fingerprint_inputs(args)  # also checks that every path exists
    kinds = [resolve_source(i, source) for i, source in enumerate(args.sources)]
    if args.tokenizer is None and any(kind in ("nanogpt", "megatron") for kind, _ in kinds):
        first = next(i for i, (kind, _) in enumerate(kinds) if kind in ("nanogpt", "megatron"))
        raise ValueError(f"data.tokenizer: data.sources[{first}] ({args.sources[first].path!r}) holds token ids; "
                         "give the tokenizer they were made with (e.g. GPT-2's tokenizer.json for nanoGPT's "
                         "OpenWebText)")
    tok = load_tokenizer(args.tokenizer, what="data.tokenizer") if args.tokenizer else None
    os.makedirs(args.dir, exist_ok=True)
    # The manifest goes first: until the new one is written the directory is not a valid data dir,
    # and a crash must not leave an old manifest describing files that are being rewritten.
    for name in os.listdir(args.dir):
        if name == MANIFEST or OLD_SHARD.match(name) or (name in TOKENIZER_FILES):
            os.remove(os.path.join(args.dir, name))

    largest = max(1, int(unit_mb * 1e6))
    text_plan = [text_units(i, args.sources[i], kind, files, args.text_field, largest)
                 if kind not in ("nanogpt", "megatron") else [] for i, (kind, files) in enumerate(kinds)]
    state = State(args.dir)
    plan = {"format": FORMAT_VERSION, "fingerprint": _hash(prepared_from), "unit_mb": unit_mb,
            "units": [u.to_dict() for units in text_plan for u in units]}
    kept = state.start(plan)
    if kept:
        say(f"resuming an interrupted preparation of {args.dir}: {kept} of {len(plan['units'])} units are done")

    if tok is None:
        tok = _trained_tokenizer(args, text_plan, state, say)
    dtype = token_dtype(tok.vocab_size)
    say(f"tokenizer: {tok.kind}, {tok.vocab_size} entries, end of text {tok.eos_id}; token ids as {dtype}")

    token_sources = {i: open_token_source(i, args.sources[i], kind, files, tok.eos_id, args.val_fraction,
                                          args.seq_len + 1)
                     for i, (kind, files) in enumerate(kinds) if kind in ("nanogpt", "megatron")}
    scans = {i: scan_units(i, [ts.train, ts.val]) for i, ts in token_sources.items()}
    units = [u for units in text_plan for u in units] + [u for split in scans.values() for u in split[0] + split[1]]
    processes = processes or default_processes()
    with _workers(processes, args=args, tok=tok, dtype=str(dtype), state=state.path, eos_id=tok.eos_id) as run:
        records = _run_units(units, state, run, processes, say)
        written = []
        for i in range(len(args.sources)):
            if i in token_sources:
                train_scan, val_scan = scans[i]
                written.append(_token_entry(i, args, token_sources[i], [records[u] for u in train_scan],
                                            [records[u] for u in val_scan], tok))
            else:
                written.append(_text_entry(i, args, text_plan[i], records, state, dtype))
        entropies = _entropies(run, args.dir, [entry["train_shards"] for entry in written], str(dtype),
                               tok.vocab_size, processes)
    for i, (source, entry, entropy) in enumerate(zip(args.sources, written, entropies)):
        entry["conditional_entropy"] = entropy
        say(f"source {i} ({source.path}): {entry['train_tokens'] + entry['val_tokens']:,} tokens, "
            f"{entry['documents']:,} documents ({entry['train_tokens']:,} train, {entry['val_tokens']:,} held out); "
            f"conditional entropy {entry['conditional_entropy']:.4f} nats")
        for note in token_sources[i].notes if i in token_sources else []:
            say(f"note: {note}")
    entropy_mix = entropy_weights([s["conditional_entropy"] for s in written])
    if len(written) > 1:
        say("entropy-driven weights (data.mixture=entropy, all sources in): " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(args.source_names(), entropy_mix)))

    tokenizer_file = tok.save(args.dir)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": _hash(prepared_from),
        "prepared_from": prepared_from,
        "tokenizer": {"file": tokenizer_file, "kind": tok.kind},
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,  # of the text sources' token files; a token-file source's shards name their own
        "seq_len": args.seq_len,  # informational: any seq_len the splits can hold may be used
        "sources": written,
        "entropy_weights": entropy_mix,  # BiMix's softmax of the entropies, every source in the mixture
    }
    write_file_atomic(os.path.join(args.dir, MANIFEST), json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(state.path, ignore_errors=True)
    total = sum(s["train_tokens"] + s["val_tokens"] for s in written)
    say(f"prepared {args.dir}: {total:,} tokens from {len(written)} source{'s' if len(written) > 1 else ''} "
        f"in {time.time() - started:.1f}s")
    return manifest


def _trained_tokenizer(args: DataArgs, text_plan: list[list[Unit]], state: State, say) -> Tokenizer:
    """The byte-level BPE the job asks for: trained once (and kept while the preparation is under way,
    so that a resumed one tokenizes its remaining units with the same tokenizer)."""
    if os.path.isfile(os.path.join(state.tokenizer_dir, "tokenizer.json")):
        return load_tokenizer(state.tokenizer_dir, what="data.tokenizer")
    say(f"training a byte-level BPE tokenizer of {args.vocab_size} entries on the sources' train text ...")
    started = time.time()
    try:
        tok = train_byte_level_bpe(_training_texts(args, text_plan), args.vocab_size)
    except ValueError as e:
        raise ValueError(f"data.vocab_size: {e}") from None
    tok.save(state.tokenizer_dir)
    say(f"  trained in {time.time() - started:.1f}s")
    return tok


def _training_texts(args: DataArgs, text_plan: list[list[Unit]]) -> Iterator[str]:
    """Text for the tokenizer trainer: of each source, evenly spaced units of the part before its
    last 2 × val_fraction (by size), at most TOKENIZER_TRAIN_CHARS in all. The held-out split is
    decided later, in tokens; leaving twice its share out keeps held-out documents out of the
    tokenizer's text unless tokens per byte differ twofold across the source."""
    total = sum(u.size for units in text_plan for u in units) or 1
    for units in text_plan:
        size = sum(u.size for u in units)
        limit = size * (1 - 2 * args.val_fraction)
        budget = TOKENIZER_TRAIN_CHARS * size / total
        stride = max(1, round(size / max(budget, 1)))
        start = 0
        for k, unit in enumerate(units):
            begins = start
            start += unit.size
            if begins >= limit:
                break
            if k % stride:
                continue
            read = begins
            for text, _ in unit_documents(unit, args.sources[unit.source], args.text_field):
                if read >= limit:
                    break
                read += len(text)
                yield text


@contextmanager
def _quiet_tokenizers_fork():
    """The Rust tokenizers' thread pool is not used by the workers (one thread each); say so, so that
    forking after the BPE trainer ran prints no warning."""
    was = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = was


_WORK: dict = {}  # what the worker processes need, set before they are forked


@contextmanager
def _workers(processes: int, **work) -> Iterator[Callable]:
    """An unordered map over `processes` forked worker processes that see `work`, or the plain map in
    this process when one."""
    _WORK.update(work)
    with _quiet_tokenizers_fork():
        pool = multiprocessing.get_context("fork").Pool(processes) if processes > 1 else None
        try:
            yield pool.imap_unordered if pool is not None else map
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            _WORK.clear()


def _do_unit(unit: Unit) -> tuple[Unit, dict]:
    w = _WORK
    if unit.kind == "scan":
        return unit, scan_unit(unit, w["eos_id"], w["state"])
    return unit, tokenize_unit(unit, w["args"].sources[unit.source], w["args"].text_field, w["tok"], w["dtype"],
                               w["args"].dir, w["state"])


def _run_units(units: list[Unit], state: State, run: Callable, processes: int,
               say: Callable[[str], None]) -> dict[Unit, dict]:
    """Every unit's record: the finished ones read back, the others worked out by `run` (the workers'
    map), with a progress line every PROGRESS_S seconds."""
    records = {u: r for u in units if (r := read_record(state.path, u)) is not None}
    todo = [u for u in units if u not in records]
    if not todo:
        return records
    total_bytes = sum(u.size for u in todo)
    say(f"preparing {len(todo)} unit{'s' if len(todo) > 1 else ''} ({total_bytes / 1e6:,.1f} MB) with "
        f"{min(processes, len(todo))} process{'es' if min(processes, len(todo)) > 1 else ''} ...")
    started = last = time.time()
    done_bytes = documents = tokens = 0
    for n, (unit, record) in enumerate(run(_do_unit, todo), 1):
        records[unit] = record
        done_bytes += unit.size
        documents += record.get("documents", record.get("eos", 0))
        tokens += record["tokens"]
        now = time.time()
        if now - last >= PROGRESS_S or n == len(todo):
            rate = done_bytes / max(now - started, 1e-9)
            eta = (total_bytes - done_bytes) / max(rate, 1e-9)
            say(f"  {n}/{len(todo)} units, {documents:,} documents, {tokens / 1e6:,.1f}M tokens, "
                f"{rate / 1e6:.1f} MB/s, {tokens / max(now - started, 1e-9) / 1e6:.2f}M tokens/s, "
                f"ETA {_duration(eta)}")
            last = now
    return records


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _text_entry(i: int, args: DataArgs, units: list[Unit], records: dict[Unit, dict], state: State,
                dtype: np.dtype) -> dict:
    """A text source's manifest entry: its units' token files, cut into train and val by the split rule."""
    what = f"data.sources[{i}] ({args.sources[i].path!r})"
    counts = [records[u]["tokens"] for u in units]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    ends = np.concatenate([np.load(ends_path(state.path, u)) + starts[k] for k, u in enumerate(units)] or
                          [np.zeros(0, np.int64)])
    if not len(ends):
        raise ValueError(f"{what} holds no (non-blank) documents")
    cut = train_tokens(ends, args.val_fraction, args.seq_len + 1, what)
    train_shards, val_shards = [], []
    for k, u in enumerate(units):
        a, b = int(starts[k]), int(starts[k + 1])
        if a < min(b, cut):
            train_shards.append({"file": token_file(u), "offset": 0, "tokens": min(b, cut) - a})
        if max(a, cut) < b:
            val_shards.append({"file": token_file(u), "offset": (max(a, cut) - a) * dtype.itemsize,
                               "tokens": b - max(a, cut)})
    n_train, n_val = documents_split(ends, cut)
    return {"path": args.sources[i].path, "kind": "text", "weight": args.sources[i].weight,
            "documents": len(ends), "train_documents": n_train, "val_documents": n_val,
            "train_tokens": cut, "val_tokens": int(starts[-1]) - cut,
            "train_shards": train_shards, "val_shards": val_shards}


def _token_entry(i: int, args: DataArgs, source: TokenSource, train: list[dict], val: list[dict],
                 tok: Tokenizer) -> dict:
    """A token-file source's entry, once every id was seen to be one of the tokenizer's."""
    largest = max(r["max_id"] for r in train + val)
    if largest >= tok.vocab_size:
        raise ValueError(f"data.sources[{i}] ({args.sources[i].path!r}) holds token id {largest}, but data.tokenizer "
                         f"has {tok.vocab_size} entries: it was made with another tokenizer (give data.tokenizer the "
                         "one it was made with)")
    if source.documents is not None:
        documents, n_train, n_val = source.documents
    else:  # end-of-text tokens; a document cut by the split counts in both
        n_train, n_val = sum(r["eos"] for r in train), sum(r["eos"] for r in val)
        last_train = int(np.asarray(open_shard("", source.train.shard(), source.train.dtype)[-1:])[0])
        documents = n_train + n_val
        if last_train != tok.eos_id:
            n_train += 1
    return {"path": args.sources[i].path, "kind": source.kind, "weight": args.sources[i].weight,
            "documents": documents, "train_documents": n_train, "val_documents": n_val,
            "train_tokens": source.train.tokens, "val_tokens": source.val.tokens,
            "train_shards": [source.train.shard()], "val_shards": [source.val.shard()]}


def _entropy_blocks(total: int, processes: int) -> list[list[tuple[int, int]]]:
    """Ranges [a, b) of a train stream of `total` tokens whose adjacent pairs are counted, in one
    list per task. All of it (ranges overlapping by one token, so no pair is lost) when it holds at
    most ENTROPY_TOKENS, else ENTROPY_TOKENS in evenly spaced blocks (pairs across blocks not counted)."""
    if total <= ENTROPY_TOKENS:
        cuts = [total * k // processes for k in range(processes + 1)]
        ranges = [(a, min(total, b + 1)) for a, b in zip(cuts, cuts[1:]) if b > a]
    else:
        block = ENTROPY_BLOCK
        stride = total // (ENTROPY_TOKENS // block)
        ranges = [(a, min(total, a + block)) for a in range(0, total - block + 1, stride)][: ENTROPY_TOKENS // block]
    return [ranges[k::processes] for k in range(processes) if ranges[k::processes]]


def _count_pairs(task: tuple) -> tuple[int, np.ndarray, np.ndarray]:
    """A worker's share of a source's bigram counts: (source, pairs, counts)."""
    source, data_dir, shards, dtype, vocab_size, ranges = task
    maps = [open_shard(data_dir, s, dtype) for s in shards if s["tokens"]]
    starts = np.cumsum([0] + [len(m) for m in maps])
    counts = BigramCounts(vocab_size)
    for a, b in ranges:
        parts = []
        for k, m in enumerate(maps):  # the range across the shards it spans
            lo, hi = max(a, int(starts[k])), min(b, int(starts[k + 1]))
            if lo < hi:
                parts.append(np.asarray(m[lo - starts[k]:hi - starts[k]]))
        counts.reset()
        counts.add(np.concatenate(parts))
    return source, counts.pairs, counts.counts


def _entropies(run: Callable, data_dir: str, splits: list[list[dict]], dtype: str, vocab_size: int,
               processes: int) -> list[float]:
    """Each source's train split's conditional entropy (launcher/data/mixture.py), counted by the workers."""
    tasks = [(i, data_dir, shards, dtype, vocab_size, ranges) for i, shards in enumerate(splits)
             for ranges in _entropy_blocks(sum(s["tokens"] for s in shards), processes)]
    totals = [BigramCounts(vocab_size) for _ in splits]
    for i, pairs, counts in run(_count_pairs, tasks):
        totals[i].merge(pairs, counts)
    return [t.conditional_entropy() for t in totals]


# ---------------------------------------------------------------------------------------------
# fingerprint, manifest, and the all-ranks entry point


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
        kind, files = resolve_source(i, source)
        if kind == "builtin":
            content = hashlib.sha256("\0".join(BUILTIN_CORPORA[source.path]()).encode()).hexdigest()
            sources.append({"path": source.path, "content": content})
            continue
        if kind == "saved":
            files = [f for f in glob.glob(os.path.join(files[0], "**", "*"), recursive=True) if os.path.isfile(f)]
        elif kind == "megatron":
            files = [files[0] + ".bin", files[0] + ".idx"]
        entry = {"path": source.path, "files": _file_stats(files)}
        if kind == "text":  # how a text file is cut into documents decides its tokens
            entry["split"] = source.split
        if kind in ("nanogpt", "megatron"):
            entry.update(format=kind, dtype=source.dtype or ("uint16" if kind == "nanogpt" else None))
        sources.append(entry)
    if args.tokenizer is None:
        tokenizer = {"train": "byte-level-bpe", "vocab_size": args.vocab_size}
    else:
        path = os.path.expanduser(args.tokenizer)
        if not os.path.exists(path):
            raise FileNotFoundError(f"data.tokenizer: no such file or directory: {args.tokenizer!r}")
        # A tokenizer directory may be another data dir: its token files and manifest are not the tokenizer.
        files = ([os.path.join(path, f) for f in os.listdir(path)
                  if f != MANIFEST and not UNIT_FILE.match(f) and not OLD_SHARD.match(f)]
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


def check_matches(manifest: dict, args: DataArgs) -> None:
    """Raises ValueError (naming data.dir) unless the manifest was prepared from these arguments."""
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"data.dir {args.dir} was prepared in format {manifest.get('format')}, this launcher "
                         f"reads format {FORMAT_VERSION}; delete it or choose another data.dir, and prepare again")
    wanted = _fingerprint_inputs(args)
    if manifest.get("fingerprint") == _hash(wanted):
        return
    had = manifest.get("prepared_from", {})
    changed = sorted(k for k in set(wanted) | set(had) if wanted.get(k) != had.get(k))
    raise ValueError(f"data.dir {args.dir} was prepared from different sources/tokenizer "
                     f"(differs in: {', '.join(changed) or 'fingerprint'}); delete it or choose another data.dir")


def prepared(args: DataArgs) -> Optional[dict]:
    """The data dir's manifest when it was prepared from these arguments; None when it is not
    prepared; ValueError when it was prepared from others."""
    manifest = load_manifest(args.dir)
    if manifest is not None:
        check_matches(manifest, args)
    return manifest


@contextmanager
def _dir_lock(directory: str, say) -> Iterator[None]:
    """One preparation of a data dir at a time (each node's front command of a multi-node job may
    try): an exclusive flock on <data.dir>/.prepare.lock, released by the kernel if its holder dies."""
    import fcntl

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".prepare.lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process preparing {directory} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_if_needed(args: DataArgs, progress: bool = True, processes: Optional[int] = None,
                      unit_mb: float = UNIT_MB, force: bool = False) -> dict:
    """The data dir's manifest, prepared first when it is not (or `force`; ValueError when it was
    prepared from other sources); one process at a time."""
    say = logger.info if progress else logger.debug
    with _dir_lock(args.dir, say):
        manifest = None if force else prepared(args)
        return manifest if manifest is not None else prepare(args, progress, processes, unit_mb)


def not_prepared(args: DataArgs) -> str:
    return (f"data.dir {args.dir} is not prepared, and every rank would wait while one tokenizes it: prepare it "
            f"first with `lawa-prepare --job JOB` (the same job and overrides; under Slurm slurm/prepare.sh), or start "
            f"with lawa-train, which prepares it before any rank starts")


def ensure_prepared(args: DataArgs, is_main: bool, barrier: Callable[[], None], world_size: int = 1) -> dict:
    """Called by every rank: the manifest, checked against these arguments. One process alone
    prepares an unprepared data dir itself; a job of several ranks never waits on one rank's
    tokenization: they all stop with one line naming lawa-prepare.

    Every rank calls `barrier()` exactly once, whatever happens, so that ranks never disagree on
    the number of collectives (one rank returning early while another waits would hang).
    """
    error = None
    if is_main and world_size == 1:
        try:
            prepare_if_needed(args)
        except BaseException as e:  # re-raised after the barrier, so the other ranks are released
            error = e
    barrier()
    if error is not None:
        raise error
    manifest = load_manifest(args.dir)
    if manifest is None:
        raise FileNotFoundError(not_prepared(args))
    check_matches(manifest, args)
    return manifest
