"""Plain-text sources read as a stream of documents, by a rule (`data.sources[i].split`):

  blank-line   documents are separated by blank lines; a line of only whitespace is blank (the
               default; WikiText's raw files hold a space on their "empty" lines)
  line         every line is a document
  whole-file   every file is one document
  regex:P      lines that match the pattern P entirely separate documents and are dropped
               (blank-line is regex:\\s*)

Files are read line by line (UTF-8, undecodable bytes replaced, `\\r\\n` read as `\\n`) and a
document is handed on in pieces of at most PIECE_CHARS characters, each marked whether it ends its
document, so no document, however long (a file with no blank lines, a line of gigabytes), is ever
held whole: memory stays bounded by the piece.

A file can be read in byte ranges that start just after a line ending a document (`document_cuts`):
each range then holds whole documents, and reading the ranges one after another gives exactly the
documents of reading the file, so they can be tokenized by separate processes.
"""
from __future__ import annotations

import codecs
import os
import re
from typing import BinaryIO, Callable, Iterator

SPLITS = ("blank-line", "line", "whole-file")
PIECE_CHARS = 1 << 16
READ_BYTES = 1 << 16  # the most of one line held at a time
BLOCK_BYTES = 1 << 20  # bytes read from the file at a time


def check_split(split: str) -> None:
    """Raises ValueError (without the key: the caller names it) for an unknown rule or a bad pattern."""
    if split in SPLITS:
        return
    if not split.startswith("regex:"):
        raise ValueError(f"must be one of {', '.join(SPLITS)} or regex:PATTERN, got {split!r}")
    try:
        re.compile(split[len("regex:"):])
    except re.error as e:
        raise ValueError(f"{split!r} is not a valid regular expression ({e})") from None


def _separator(split: str) -> Callable[[str], bool]:
    """Whether a whole line (its text, newline included) separates documents."""
    if split == "blank-line":
        return lambda line: not line.strip()
    if split == "whole-file":
        return lambda line: False
    if split == "line":
        return lambda line: True
    pattern = re.compile(split[len("regex:"):])
    return lambda line: pattern.fullmatch(line.rstrip("\r\n")) is not None


def _lines(handle: BinaryIO, stop: int) -> Iterator[tuple[str, bool, int]]:
    """(text, whole, end) for each line of the file from its position up to byte `stop`, read a block
    at a time: a line longer than READ_BYTES comes in parts, `whole` on the part that ends it; `end`
    is the byte offset just after the part."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    position = handle.tell()
    pending = b""
    while True:
        block = handle.read(min(BLOCK_BYTES, stop - position - len(pending))) if position + len(pending) < stop else b""
        data = pending + block
        if not data:
            return
        lines = data.split(b"\n")
        pending = lines.pop() if block else b""  # the last, unfinished line waits for the next block
        for raw in lines:
            while len(raw) > READ_BYTES:  # a long line: its leading parts
                part, raw = _split(raw)
                position += len(part)
                yield decoder.decode(part), False, position
            position += len(raw) + 1
            text = decoder.decode(raw)
            yield (text[:-1] if text.endswith("\r") else text) + "\n", True, position
        if not block and pending:
            position += len(pending)
            yield decoder.decode(pending, final=True), False, position  # the file's last line, unfinished
            return
        while len(pending) >= READ_BYTES:
            part, pending = _split(pending)
            position += len(part)
            yield decoder.decode(part), False, position


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """READ_BYTES of a line, and the rest (\r\n kept together)."""
    cut = READ_BYTES - (raw[READ_BYTES - 1:READ_BYTES] == b"\r")
    return raw[:cut], raw[cut:]


def text_pieces(files: list[str], split: str, ranges: list[tuple[int, int]] | None = None) -> Iterator[dict]:
    """{"text": ..., "last": bool} records: the documents of `files` under `split`, in pieces;
    `ranges`: (start, stop) bytes of each file to read (from `document_cuts`), default whole files."""
    check_split(split)
    per_line = split == "line"
    is_separator = _separator(split)
    for k, path in enumerate(files):
        start, stop = ranges[k] if ranges is not None else (0, os.path.getsize(path))
        with open(path, "rb") as handle:
            handle.seek(start)
            parts: list[str] = []
            size = 0
            emitted = False  # a piece of the current document went out already

            def flush(last: bool):
                nonlocal parts, size, emitted
                text = "".join(parts)
                if last:
                    text = text.removesuffix("\n")
                parts, size = [], 0
                if emitted or text.strip():  # a blank document is left out; a blank end of a long one is not
                    emitted = not last
                    return {"text": text, "last": last}
                return None

            at_line_start = True
            for line, whole, _ in _lines(handle, stop):
                if per_line:
                    parts.append(line)
                    size += len(line)
                    piece = flush(last=whole) if whole or size >= PIECE_CHARS else None
                elif whole and at_line_start and is_separator(line):
                    piece = flush(last=True)
                else:
                    parts.append(line)
                    size += len(line)
                    piece = flush(last=False) if size >= PIECE_CHARS else None
                at_line_start = whole
                if piece is not None:
                    yield piece
            end = flush(last=True)  # the range's last document
            if end is not None:
                yield end


def document_cuts(path: str, split: str, target_bytes: int) -> list[int]:
    """Byte offsets 0 = c_0 < c_1 < ... < c_n = size that cut the file into ranges of about
    `target_bytes`, each inner cut just after a whole line that ends a document under `split` (so a
    range never splits a document); a document longer than the target makes its range longer."""
    size = os.path.getsize(path)
    cuts = [0]
    if split == "whole-file":
        return [0, size]
    is_separator = _separator(split)
    with open(path, "rb") as handle:
        guess = target_bytes
        while guess < size:
            handle.seek(guess)
            cut = size
            at_line_start = False  # the guess may fall inside a line: that line cannot count
            for line, whole, end in _lines(handle, size):
                if whole and at_line_start and is_separator(line) or (whole and split == "line"):
                    cut = end
                    break
                at_line_start = whole
            if cut >= size:
                break
            cuts.append(cut)
            guess = cut + target_bytes
    cuts.append(size)
    return cuts
