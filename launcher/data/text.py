"""Plain-text sources read as a stream of documents, by a rule (`data.sources[i].split`):

  blank-line   documents are separated by blank lines; a line of only whitespace is blank (the
               default; WikiText's raw files hold a space on their "empty" lines)
  line         every line is a document
  whole-file   every file is one document
  regex:P      lines that match the pattern P entirely separate documents and are dropped
               (blank-line is regex:\\s*)

Files are read line by line and a document is handed on in pieces of at most PIECE_CHARS
characters, each marked whether it ends its document, so no document, however long (a file with
no blank lines, a line of gigabytes), is ever held whole: memory stays bounded by the piece.
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

SPLITS = ("blank-line", "line", "whole-file")
PIECE_CHARS = 1 << 16
READ_CHARS = 1 << 16  # the most of one line read at a time


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
    if split == "blank-line":
        return lambda line: not line.strip()
    if split == "whole-file":
        return lambda line: False
    pattern = re.compile(split[len("regex:"):])
    return lambda line: pattern.fullmatch(line.rstrip("\r\n")) is not None


def text_pieces(files: list[str], split: str) -> Iterator[dict]:
    """{"text": ..., "last": bool} records: the documents of `files` under `split`, in pieces."""
    check_split(split)
    per_line = split == "line"
    is_separator = None if per_line else _separator(split)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as handle:
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

            while True:
                line = handle.readline(READ_CHARS)
                if not line:
                    break
                whole = line.endswith("\n")
                if per_line:
                    parts.append(line)
                    size += len(line)
                    piece = flush(last=whole) if whole or size >= PIECE_CHARS else None
                elif whole and is_separator(line):
                    piece = flush(last=True)
                else:
                    parts.append(line)
                    size += len(line)
                    piece = flush(last=False) if size >= PIECE_CHARS else None
                if piece is not None:
                    yield piece
            end = flush(last=True)  # the file's last document
            if end is not None:
                yield end
