"""Preparation's units of work: each text source cut into pieces of whole documents that processes
tokenize independently, each into one token file of the data dir; each token file of a corpus
tokenized elsewhere cut into ranges whose ids are checked.

A unit's file is written under a temporary name and renamed, and its record (`<unit>.json`, with
its documents' ends in `<unit>.ends.npy`) written after it: a unit is done exactly when its record
exists, so an interrupted preparation keeps its finished units and redoes the rest. Units hold
whole documents and a document is tokenized the same wherever it falls, so the tokens do not depend
on how the sources were cut (nor on the number of processes).

This module imports neither torch nor DeepSpeed: worker processes stay small.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import numpy as np

from core.files import atomic_file, write_file_atomic
from core.tokenizer import Tokenizer
from launcher.data.sources import BUILTIN_CORPORA, DataSource, datasets_module, is_document
from launcher.data.text import document_cuts, text_pieces

MIN_UNIT_BYTES = 1 << 20  # a source is cut into pieces no smaller than this (or than the largest unit)...
UNITS_PER_SOURCE = 64  # ... and into at least this many when it is big enough: processes share it out
ENCODE_CHARS = 1 << 20  # characters of text tokenized in one call
SCAN_TOKENS = 1 << 27  # token ids checked per unit of a token file


@dataclass(frozen=True)
class Unit:
    """A piece of one source: `kind` says how to read [start, stop): bytes of a .txt/.jsonl file,
    row groups of a .parquet file, records of a saved dataset or builtin corpus, a whole .json file,
    or token ids of a token file."""

    source: int
    index: int  # within the source, in the order the source is read
    kind: str  # text | jsonl | json | parquet | saved | builtin | scan
    path: str
    start: int
    stop: int
    size: int  # bytes of input it stands for (for progress)
    dtype: str = ""  # scan: the token file's dtype

    @property
    def name(self) -> str:
        return f"{self.source}_{self.index:05d}"

    def to_dict(self) -> dict:
        return asdict(self)


def unit_bytes(total: int, largest: int) -> int:
    """Units of about total/UNITS_PER_SOURCE bytes, between MIN_UNIT_BYTES and `largest` (each
    bound the smaller of the two when they cross)."""
    return max(min(MIN_UNIT_BYTES, largest), min(largest, -(-total // UNITS_PER_SOURCE)))


# ---------------------------------------------------------------------------------------------
# planning


def text_units(i: int, source: DataSource, kind: str, files: list[str], text_field: str, largest: int) -> list[Unit]:
    """The units of one text source (resolve_source's kind and files), in reading order. A text
    column that is missing or not text is refused here, before any process starts."""
    units: list[Unit] = []

    def add(kind_: str, path: str, start: int, stop: int, size: int) -> None:
        units.append(Unit(i, len(units), kind_, path, start, stop, size))

    if kind == "builtin":
        lengths = [len(d) for d in _builtin(source.path)]
        target = unit_bytes(sum(lengths), largest)
        start, size = 0, 0
        for k, n in enumerate(lengths):
            size += n
            if size >= target or k == len(lengths) - 1:
                add("builtin", source.path, start, k + 1, size)
                start, size = k + 1, 0
        return units
    if kind == "saved":
        ds = _saved(i, source.path, text_field)
        n = len(ds)
        target = unit_bytes(ds.data.nbytes, largest)
        per = max(1, int(n * target / max(1, ds.data.nbytes)))
        for start in range(0, n, per):
            add("saved", files[0], start, min(n, start + per), ds.data.nbytes * (min(n, start + per) - start) // n)
        return units
    total = sum(os.path.getsize(f) for f in files)
    target = unit_bytes(total, largest)
    for path in files:
        if kind == "parquet":
            for start, stop, size in _row_group_units(i, path, text_field, target):
                add("parquet", path, start, stop, size)
        elif kind == "json" and _is_json_array(path):
            _check_record(i, path, _first_array_record(path), text_field)
            add("json", path, 0, 1, os.path.getsize(path))
        elif kind in ("json", "jsonl"):
            _check_record(i, path, _first_json_line(path), text_field)
            cuts = document_cuts(path, "line", target)
            for start, stop in zip(cuts, cuts[1:]):
                add("jsonl", path, start, stop, stop - start)
        else:
            cuts = document_cuts(path, source.split, target)
            for start, stop in zip(cuts, cuts[1:]):
                add("text", path, start, stop, stop - start)
    return units


def scan_units(i: int, ranges: list) -> tuple[list[Unit], ...]:
    """For each TokenRange of source i (its train and val splits), the units that check its ids."""
    out, k = [], 0
    for r in ranges:
        size = np.dtype(r.dtype).itemsize
        units = []
        for a in range(r.first, r.first + r.tokens, SCAN_TOKENS):
            b = min(r.first + r.tokens, a + SCAN_TOKENS)
            units.append(Unit(i, k, "scan", r.path, a, b, (b - a) * size, r.dtype))
            k += 1
        out.append(units)
    return tuple(out)


def _column_error(i: int, path: str, text_field: str, found) -> ValueError:
    return ValueError(f"data.text_field: column {text_field!r} not found in data.sources[{i}] ({path!r}); "
                      f"columns found: {sorted(found)}")


def _record_problem(record, text_field: str) -> Optional[str]:
    """What is wrong with a JSON record as a document (None: nothing)."""
    if not isinstance(record, dict) or text_field not in record:
        return f"no {text_field!r} field (data.text_field)"
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        return f"{text_field!r} holds {type(value).__name__}, not text (data.text_field)"
    return None


def _check_record(i: int, path: str, record, text_field: str) -> None:
    """The first record of a JSON source, checked before any process starts."""
    if record is None:
        return  # an empty file: no documents (said once every unit is read)
    if not isinstance(record, dict) or text_field not in record:
        raise _column_error(i, path, text_field, record.keys() if isinstance(record, dict) else [])
    if _record_problem(record, text_field):
        raise ValueError(f"data.text_field: column {text_field!r} of data.sources[{i}] ({path!r}) holds "
                         f"{type(record[text_field]).__name__}, not text")


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _first_array_record(path: str):
    records = _read_json_array(path)
    return records[0] if records else None


def _read_json_array(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def _first_json_line(path: str):
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON record ({e.msg})") from None
    return None


def _row_group_units(i: int, path: str, text_field: str, target: int) -> Iterator[tuple[int, int, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path)
    schema = meta.schema_arrow
    if text_field not in schema.names:
        raise _column_error(i, path, text_field, schema.names)
    if not pa.types.is_string(schema.field(text_field).type) and not pa.types.is_large_string(schema.field(text_field).type):
        raise ValueError(f"data.text_field: column {text_field!r} of data.sources[{i}] ({path!r}) holds "
                         f"{schema.field(text_field).type}, not text")
    start, size = 0, 0
    groups = meta.metadata.num_row_groups
    for g in range(groups):
        size += meta.metadata.row_group(g).total_byte_size
        if size >= target or g == groups - 1:
            yield start, g + 1, size
            start, size = g + 1, 0


def _saved(i: int, path: str, text_field: str):
    datasets = datasets_module()
    try:
        ds = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.sources[{i}].path: could not read the saved dataset {path!r}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise ValueError(f"data.sources[{i}].path: the saved DatasetDict {path!r} has splits {sorted(ds)} but "
                             "no 'train' split to read")
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise _column_error(i, path, text_field, ds.column_names)
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"data.text_field: column {text_field!r} of data.sources[{i}] ({path!r}) holds {feature}, "
                         f"not text")
    return ds


# ---------------------------------------------------------------------------------------------
# reading a unit's documents


def unit_documents(unit: Unit, source: DataSource, text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, ends its document) for each piece of the unit's documents, blank documents left out."""
    if unit.kind == "text":
        for piece in text_pieces([unit.path], source.split, [(unit.start, unit.stop)]):
            yield piece["text"], piece["last"]
        return
    for text in _records(unit, text_field):
        if is_document(text):
            yield text, True


@functools.lru_cache(maxsize=1)
def _builtin(name: str) -> list[str]:
    return BUILTIN_CORPORA[name]()


def _records(unit: Unit, text_field: str) -> Iterator[Optional[str]]:
    if unit.kind == "builtin":
        yield from _builtin(unit.path)[unit.start:unit.stop]
    elif unit.kind == "jsonl":
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            data = f.read(unit.stop - unit.start).decode("utf-8", errors="replace")
        for n, line in enumerate(data.split("\n"), 1):  # JSON strings may hold U+2028: not str.splitlines
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = _record_problem(record, text_field)
            except json.JSONDecodeError as e:
                problem = f"not a JSON record ({e.msg})"
            if problem:
                raise ValueError(f"{unit.path}:{_lines_before(unit.path, unit.start) + n}: {problem}")
            yield record[text_field]
    elif unit.kind == "json":
        for n, record in enumerate(_read_json_array(unit.path), 1):
            problem = _record_problem(record, text_field)
            if problem:
                raise ValueError(f"{unit.path}: record {n}: {problem}")
            yield record[text_field]
    elif unit.kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(unit.path).read_row_groups(range(unit.start, unit.stop), columns=[text_field])
        for batch in table.to_batches(max_chunksize=1000):
            yield from batch.column(0).to_pylist()
    elif unit.kind == "saved":
        ds = _saved(unit.source, unit.path, text_field).select(range(unit.start, unit.stop))
        for batch in ds.with_format("arrow").iter(batch_size=1000):
            yield from batch.column(text_field).to_pylist()
    else:
        raise ValueError(f"unit kind {unit.kind!r} holds no text")


def _lines_before(path: str, offset: int) -> int:
    """Newlines before byte `offset` (for a line number in a message: read only when a record is bad)."""
    count = 0
    with open(path, "rb") as f:
        while f.tell() < offset:
            count += f.read(min(1 << 24, offset - f.tell())).count(b"\n")
    return count


# ---------------------------------------------------------------------------------------------
# the work


def record_path(state_dir: str, unit: Unit) -> str:
    return os.path.join(state_dir, f"{unit.name}.json")


def ends_path(state_dir: str, unit: Unit) -> str:
    return os.path.join(state_dir, f"{unit.name}.ends.npy")


def token_file(unit: Unit) -> str:
    """The unit's token file, in the data dir."""
    return f"{unit.name}.bin"


def read_record(state_dir: str, unit: Unit) -> Optional[dict]:
    try:
        with open(record_path(state_dir, unit)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):  # not done (or torn by a crash: done again)
        return None


def tokenize_unit(unit: Unit, source: DataSource, text_field: str, tok: Tokenizer, dtype: str, data_dir: str,
                  state_dir: str) -> dict:
    """Tokenizes the unit's documents (EOS after each) into its token file; returns (and records)
    {"tokens", "documents", "size"}; the documents' ends go to `<unit>.ends.npy`."""
    ends: list[int] = []
    written = 0
    batch: list[tuple[str, bool]] = []
    chars = 0
    with atomic_file(os.path.join(data_dir, token_file(unit))) as out:
        def flush() -> None:
            nonlocal written, batch, chars
            if not batch:
                return
            flat: list[int] = []
            for doc, (_, last) in zip(tok.encode_batch([text for text, _ in batch], threads=1), batch):
                flat += doc
                if last:
                    flat.append(tok.eos_id)
                    ends.append(written + len(flat))
            np.asarray(flat, dtype=dtype).tofile(out)
            written += len(flat)
            batch, chars = [], 0

        for text, last in unit_documents(unit, source, text_field):
            batch.append((text, last))
            chars += len(text)
            if chars >= ENCODE_CHARS:
                flush()
        flush()
    np.save(ends_path(state_dir, unit), np.asarray(ends, dtype=np.int64))
    record = {"tokens": written, "documents": len(ends), "size": unit.size}
    write_file_atomic(record_path(state_dir, unit), json.dumps(record) + "\n")
    return record


def scan_unit(unit: Unit, eos_id: int, state_dir: str) -> dict:
    """The largest id and the end-of-text count of a range of a token file; recorded like a unit's."""
    tokens = np.memmap(unit.path, dtype=unit.dtype, mode="r")[unit.start:unit.stop]
    largest, eos = -1, 0
    for a in range(0, len(tokens), 1 << 24):
        part = np.asarray(tokens[a:a + (1 << 24)])
        if len(part):
            largest = max(largest, int(part.max()))
            eos += int(np.count_nonzero(part == eos_id))
    record = {"tokens": unit.stop - unit.start, "max_id": largest, "eos": eos, "size": unit.size}
    write_file_atomic(record_path(state_dir, unit), json.dumps(record) + "\n")
    return record
