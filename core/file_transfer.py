"""Folders sent between ranks over a (gloo) process group: a node's part of a restart slot to its
buddy node in the background, and back to a replaced node at restart (launcher/buddy.py).

One call does both directions of a step of a ring (send one folder, receive another): the offer
(each file's name and size, plus a small dict the caller fills) goes first, then every file's bytes
in fixed-size chunks, sends posted ahead (isend) while receives block, so two ranks that send to
each other never wait on one another. A receiver writes each file under a folder the caller stages
(core.files.staged); the caller checks the files against the records its folder's own manifest
carries before it renames the folder into place: what arrives is whole and verified, or is not
there at all.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from core.files import fsync_dir

CHUNK = 8 << 20  # bytes per message: large enough for the link, small enough to keep two in flight


class TransferError(RuntimeError):
    """What arrived cannot be used (a name outside the folder, bytes not matching their record)."""


@dataclass
class FolderOffer:
    """What a sender is about to send: files by name relative to its folder, with their sizes, and
    `meta` (the caller's: e.g. the slot's step and whose part it is). No files: nothing to send."""

    files: list[tuple[str, int]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def encode(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(json.dumps(asdict(self)).encode()), dtype=torch.uint8)

    @classmethod
    def decode(cls, data: torch.Tensor) -> FolderOffer:
        raw = json.loads(bytes(data.numpy()).decode())
        return cls(files=[(str(name), int(size)) for name, size in raw["files"]], meta=dict(raw["meta"]))


def offer_folder(folder: str, names: list[str], meta: dict[str, Any]) -> tuple[FolderOffer, list[int]]:
    """An offer of `names` (relative to `folder`) and their open file descriptors, opened now: a file
    the ring recycles while it is sent stays readable to the end (the caller closes them)."""
    fds, files = [], []
    try:
        for name in names:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            fds.append(fd)
            files.append((name, os.fstat(fd).st_size))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return FolderOffer(files, meta), fds


def _inside(root: str, name: str) -> str:
    path = os.path.normpath(os.path.join(root, name))
    if os.path.isabs(name) or not path.startswith(os.path.normpath(root) + os.sep):
        raise TransferError(f"refusing a file named {name!r}: it is outside the folder it is sent into")
    return path


def _chunks(total: int) -> list[int]:
    return [min(CHUNK, total - pos) for pos in range(0, total, CHUNK)]


def exchange(group: dist.ProcessGroup, send_to: Optional[int] = None, offer: Optional[FolderOffer] = None,
             fds: Optional[list[int]] = None, take_from: Optional[int] = None,
             into: Optional[str] = None) -> Optional[FolderOffer]:
    """Send `offer`'s files (read from `fds`, in its order) to global rank `send_to`, and receive
    the folder global rank `take_from` sends into the existing folder `into` (files 0600, folders
    0700: what is sent is private data); both, one or neither.
    Returns the offer received (None when receiving nothing). Every byte announced is sent and
    received whatever goes wrong here (a file that cannot be read goes as zeros, one that cannot be
    written is received and dropped, a name outside `into` is refused), so the two ranks stay in
    step for the next call; TransferError then says what went wrong. The caller checks what
    arrived against the records it vouches for (core.integrity)."""
    pending: list[tuple[dist.Work, torch.Tensor]] = []
    problem: Optional[str] = None

    def send(tensor: torch.Tensor) -> None:
        pending.append((dist.isend(tensor, send_to, group=group), tensor))
        while len(pending) > 2:  # a bounded number of buffers in flight
            work, _ = pending.pop(0)
            work.wait()

    outgoing: list[tuple[int, int]] = []  # (fd, size) of each chunk
    if send_to is not None:
        header = (offer or FolderOffer()).encode()
        send(torch.tensor([header.numel()], dtype=torch.int64))
        send(header)
        outgoing = [(fd, size) for fd, (_, total) in zip(fds or [], offer.files if offer else []) for size in _chunks(total)]
    received: Optional[FolderOffer] = None
    incoming: list[tuple[str, int]] = []
    if take_from is not None:
        length = torch.zeros(1, dtype=torch.int64)
        dist.recv(length, take_from, group=group)
        header = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.recv(header, take_from, group=group)
        received = FolderOffer.decode(header)
        for name, total in received.files:
            try:
                _inside(into, name)
            except TransferError as e:
                problem = problem or str(e)
            incoming += [(name, size) for size in _chunks(total)] or [(name, 0)]
    files: dict[str, Any] = {}
    try:
        for i in range(max(len(outgoing), len(incoming))):
            if i < len(outgoing):
                fd, size = outgoing[i]
                buffer = bytearray(size)
                try:
                    _read_into(fd, buffer)
                except OSError as e:
                    problem = problem or f"a file being sent could not be read: {e}"
                send(torch.frombuffer(buffer, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8))
            if i < len(incoming):
                name, size = incoming[i]
                chunk = torch.empty(size, dtype=torch.uint8)
                if size:
                    dist.recv(chunk, take_from, group=group)
                if problem is None:
                    try:
                        if name not in files:
                            path = _inside(into, name)
                            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                            files[name] = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
                        files[name].write(memoryview(chunk.numpy()))
                    except OSError as e:
                        problem = f"{name} could not be written: {e}"
        for work, _ in pending:
            work.wait()
    finally:
        for f in files.values():
            with contextlib.suppress(OSError):
                f.flush()
                os.fsync(f.fileno())
            f.close()
    if problem is not None:
        raise TransferError(problem)
    if into is not None and files:
        for folder in {os.path.dirname(_inside(into, name)) for name in files}:
            fsync_dir(folder)
    return received


def _read_into(fd: int, buffer: bytearray) -> None:
    view, got = memoryview(buffer), 0
    while got < len(buffer):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise OSError(f"the file ended {len(buffer) - got} bytes early")
        got += n
