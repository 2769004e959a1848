"""Every file this project commits is recorded, by size and xxh3-64, in the marker that makes its
folder count (a slot's manifest.json, a checkpoint's run_state.json); every reader checks a file
against its record before it uses a byte of it, and a mismatch is one line naming the file.

One open file serves both: the checksum is taken over a read-only map of the open file, and the
tensors are then mapped from that same open file (/proc/self/fd), so what is verified is what is
loaded (writers replace files by rename, never in place) and the bytes are never held twice (pages
come from the page cache; for /dev/shm that is RAM itself).
"""
from __future__ import annotations

import mmap
import os
from typing import Any, Optional

import xxhash

from core import pickles

FileRecord = dict  # {"bytes": size, "xxh3": hex digest}


class ChecksumMismatch(ValueError):
    """A file whose bytes are not the ones its folder's record vouches for."""


def checksum(data: bytes | memoryview | mmap.mmap) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def record_of(data: bytes | memoryview) -> FileRecord:
    """The record of bytes about to be written."""
    return {"bytes": len(data), "xxh3": checksum(data)}


def _checked_fd(fd: int, shown_as: str, expected: Optional[FileRecord]) -> FileRecord:
    """The record of an open file; ChecksumMismatch when it differs from `expected` (if given)."""
    size = os.fstat(fd).st_size
    if expected is not None and size != expected["bytes"]:
        raise ChecksumMismatch(f"{shown_as} is {size} bytes, its record says {expected['bytes']}: torn or changed")
    if size == 0:
        digest = checksum(b"")
    else:
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            digest = checksum(data)
    if expected is not None and digest != expected["xxh3"]:
        raise ChecksumMismatch(f"{shown_as} does not match its checksum (xxh3 {digest}, recorded {expected['xxh3']})")
    return {"bytes": size, "xxh3": digest}


def record_file(path: str, fsync: bool = False) -> FileRecord:
    """The record of a file on disk (made durable first with `fsync`)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if fsync:
            os.fsync(fd)
        return _checked_fd(fd, path, None)
    finally:
        os.close(fd)


def verify_file(path: str, expected: FileRecord) -> None:
    """ChecksumMismatch (FileNotFoundError) unless the file is the one recorded."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _checked_fd(fd, path, expected)
    finally:
        os.close(fd)


def load_verified(path: str, expected: Optional[FileRecord]) -> Any:
    """A torch file's object, once its bytes match `expected` (None: a folder that records nothing,
    e.g. another tool's checkpoint, is read as it is); unpickled weights-only (core.pickles)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if expected is not None:
            _checked_fd(fd, path, expected)
        return pickles.load(f"/proc/self/fd/{fd}", shown_as=path)
    finally:
        os.close(fd)
