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
READ_BYTES = 1 << 16  # the most of one line read at a time


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


def _lines(handle: BinaryIO, stop: int) -> Iterator[tuple[str, bool]]:
    """(text, whole) for each line of the file from its position up to byte `stop`: a long line comes
    in parts of at most READ_BYTES bytes, `whole` on the part that ends it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while handle.tell() < stop:
        raw = handle.readline(min(READ_BYTES, stop - handle.tell()))
        if not raw:
            break
        if raw.endswith(b"\r") and handle.tell() < stop and handle.peek(1)[:1] == b"\n":
            raw += handle.read(1)  # a part that would end between \r and \n
        whole = raw.endswith(b"\n")
        text = decoder.decode(raw, final=handle.tell() >= stop)
        if text.endswith("\r\n"):
            text = text[:-2] + "\n"
        yield text, whole


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
            for line, whole in _lines(handle, stop):
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
            for line, whole in _lines(handle, size):
                if whole and at_line_start and is_separator(line) or (whole and split == "line"):
                    cut = handle.tell()
                    break
                at_line_start = whole
            if cut >= size:
                break
            cuts.append(cut)
            guess = cut + target_bytes
    cuts.append(size)
    return cuts
