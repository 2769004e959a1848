"""Files: one atomic write, the fsyncs around it, torch (de)serialisation, JSONL reading, staged
output folders (and the stale ones a killed writer left), and the names of step folders
(`step_00001000`). Folders only this user can change: core/private_folder.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any, Iterator, Optional

STEP_PREFIX = "step_"
# Step-named folders of other tools, recognised when reading: DeepSpeed's tags and HF Trainer's.
FOREIGN_STEP_NAME = re.compile(r"^(?:step_(\d+)|global_step(\d+)|checkpoint-(\d+))$")


def step_name(step: int) -> str:
    """The folder name of a checkpoint or snapshot slot of `step`."""
    return f"{STEP_PREFIX}{step:08d}"


def step_of(name: str) -> Optional[int]:
    """The step of one of our step folders (`step_00001000`), else None."""
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def any_step_of(path: str) -> Optional[int]:
    """The step in a folder name of ours, DeepSpeed's (`global_step1000`) or HF's (`checkpoint-1000`)."""
    match = FOREIGN_STEP_NAME.match(os.path.basename(os.path.normpath(path)))
    return int(next(g for g in match.groups() if g is not None)) if match else None


# ---------------------------------------------------------------------------------------------
# writing


PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<host>[^/]+)-(?P<pid>\d+)$")


def partial_name(out: str, unique: bool = False) -> str:
    """The staged sibling of `out` while it is written: hidden, not step-named (nothing that lists
    checkpoints or slots mistakes it for one), and naming its writer (host and pid), so that one
    whose writer is gone is known for what it is (`stale_partials`). `unique`: also one of its own
    among the writer's threads."""
    parent, base = os.path.split(os.path.abspath(out))
    if unique:
        base = f"{base}.{uuid.uuid4().hex[:8]}"
    return os.path.join(parent, f".{base}.partial-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str, mode: Optional[int] = None) -> Iterator[io.BufferedWriter]:
    """A file written under a temporary name, fsynced and renamed to `path` when the block ends:
    readers see the old file or the whole new one, never a part (a failed block leaves neither).
    `mode`: the file's permissions (e.g. 0o600 for the snapshot ring's); None: 0o666 less the umask."""
    # Unique per writer, so that two writers of the same path never share a temporary file; named as
    # a partial, so that what a killed writer left is known for what it is.
    tmp = partial_name(path, unique=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_file_atomic(path: str, data: bytes | memoryview | str, max_bytes_per_s: float = 0.0,
                      mode: Optional[int] = None) -> None:
    """`data` written through `atomic_file`, optionally throttled to max_bytes_per_s (shared disks)."""
    if isinstance(data, str):
        data = data.encode()
    view = memoryview(data)
    chunk = 1 << 20 if max_bytes_per_s > 0 else 64 << 20
    start = time.monotonic()
    with atomic_file(path, mode) as f:
        for pos in range(0, len(view), chunk):
            f.write(view[pos: pos + chunk])
            if max_bytes_per_s > 0:
                ahead = min(pos + chunk, len(view)) / max_bytes_per_s - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)


def write_json_atomic(path: str, obj: Any) -> None:
    write_file_atomic(path, json.dumps(obj, indent=1) + "\n")


def fsync_dir(path: str) -> None:
    """Make renames inside `path` durable (a marker must never outlive the files it vouches for)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    files = [os.path.join(d, f) for d, _, names in os.walk(path) for f in names] if os.path.isdir(path) else [path]
    for file in files:
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def remove_path(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


class OutputExists(FileExistsError):
    """The output of a staged write appeared while we worked (and we may not replace it)."""


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def stale_partials(folder: str) -> list[str]:
    """The staged folders and files in `folder` whose writer, a process of this host, is gone
    (killed mid-write: torchrun's kill, a preemption, an OOM kill)."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(folder):
            match = PARTIAL.match(name)
            if match and match["host"] == socket.gethostname() and not _running(int(match["pid"])):
                found.append(os.path.join(folder, name))
    return found


@contextlib.contextmanager
def staged(out: str, replace: bool = True) -> Iterator[str]:
    """A temporary sibling to write a file or folder into (`partial_name`), renamed to `out` only
    when everything is in it and on disk: a crash leaves no half-written `out`."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = partial_name(out)
    remove_path(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.lexists(out):
            if not replace:
                raise OutputExists(f"{out} already exists")
            old = f"{tmp}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            remove_path(old)
        else:
            os.replace(tmp, out)
        fsync_dir(parent)
    finally:
        remove_path(tmp)


def serialize(obj: Any) -> memoryview:
    """torch.save into memory (its bytes are checksummed and written in one atomic write)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


# ---------------------------------------------------------------------------------------------
# JSON lines


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """Every record of a JSON-lines file; none when it does not exist. A torn last line (a writer
    killed mid-write) is left out."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    if line.endswith("\n"):
                        raise
    return records


class JsonlTail:
    """Follows a JSON-lines file that another process appends to: each `read()` returns the whole
    lines added since the last, without re-reading the file."""

    def __init__(self, path: str, from_end: bool = True):
        self.path = path
        self.offset = os.path.getsize(path) if from_end and os.path.isfile(path) else 0

    def read(self) -> list[dict[str, Any]]:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """One record as one line, flushed: a reader never sees half of it as a whole line."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
