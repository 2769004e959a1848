"""One run per run directory (and per snapshot ring), for the run's whole life, across the nodes of a
shared file system.

A lock is a file, `<folder>/.lock`, made with O_CREAT|O_EXCL and holding its holder: host, pid, the
pid's start time (so a reused pid is not taken for the holder) and a heartbeat time that a thread
rewrites every HEARTBEAT_S seconds. flock alone would not do: on many shared file systems it is not
seen from other nodes. Another process may take the lock over only when its holder is gone: on the
same host, the holder's pid no longer runs (or is another process); on another host, the heartbeat
has stopped (older than STALE_S by this host's clock, or not moving for two beats when the clocks
may differ). Taking over is said in one line; a lock whose holder lives is one line naming the
holder, and nothing of the run is touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from core.files import write_file_atomic

LOCK = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # a heartbeat this old (by this host's clock) is a dead holder's


class Locked(RuntimeError):
    """The folder is held by a live process; the message names it."""


@dataclass
class Holder:
    host: str
    pid: int
    started: Optional[int]  # the pid's start time (/proc/<pid>/stat), None where unknown
    heartbeat: float  # time.time() of the holder's last beat
    what: str = ""  # e.g. the run's name

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f" ({self.what})" if self.what else "")


def _start_time(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _read(path: str) -> Optional[Holder]:
    try:
        with open(path) as f:
            data = json.load(f)
        return Holder(**{k: data[k] for k in ("host", "pid", "started", "heartbeat", "what") if k in data})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return Holder("?", -1, None, 0.0, "unreadable lock")  # torn by a crash: no live holder wrote it


def alive(holder: Holder) -> bool:
    """Whether the holder still runs (see the module's doc)."""
    if holder.pid < 0:
        return False
    if holder.host == socket.gethostname():
        return _start_time(holder.pid) is not None and _start_time(holder.pid) == holder.started
    if time.time() - holder.heartbeat > STALE_S:
        return False
    return True  # recent by our clock: watched for a beat by the caller


class RunLock:
    """The lock on `folder` (see the module's doc): `acquire`, then `release` at the end."""

    def __init__(self, folder: str, what: str = ""):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK)
        self.me = Holder(socket.gethostname(), os.getpid(), _start_time(os.getpid()), time.time(), what)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.took_over: Optional[Holder] = None

    def holder(self) -> Optional[Holder]:
        """The live process holding the folder, if another one does (None: free, or its holder is gone)."""
        held = _read(self.path)
        if held is None or (held.host, held.pid) == (self.me.host, self.me.pid) or not alive(held):
            return None
        if held.host != self.me.host:  # recent by our clock; clocks may differ: is it still beating?
            deadline = time.time() + 2.5 * HEARTBEAT_S
            while time.time() < deadline:
                time.sleep(0.5)
                now = _read(self.path)
                if now is None or now.heartbeat != held.heartbeat:
                    return now if now is not None else None
            return None
        return held

    def acquire(self) -> Optional[str]:
        """Holds the folder; returns the one line to say when a dead holder's lock was taken over.
        Locked when a live process holds it."""
        os.makedirs(self.folder, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                live = self.holder()
                if live is not None:
                    raise Locked(f"{self.folder} is in use by {live.describe()}, which is still running: stop it first "
                                 f"(or choose another run_dir)") from None
                self.took_over = _read(self.path)
                # Renamed aside before the exclusive create, so that two takers cannot both win.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, f"{self.path}.stale-{self.me.host}-{self.me.pid}")
                    os.remove(f"{self.path}.stale-{self.me.host}-{self.me.pid}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(self.me), f)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock")
            self._thread.start()
            if self.took_over is not None:
                return (f"took over {self.path}: its holder, {self.took_over.describe()}, is gone "
                        f"(killed, or its node lost)")
            return None
        raise Locked(f"{self.folder}: could not take its lock (another process keeps taking it)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.me.heartbeat = time.time()
            try:
                held = _read(self.path) or self.me
                if (held.host, held.pid) != (self.me.host, self.me.pid):
                    return  # taken over by someone who judged us gone: theirs now
                write_file_atomic(self.path, json.dumps(asdict(self.me)))
            except OSError:
                pass  # the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = _read(self.path)
        if held is not None and (held.host, held.pid) == (self.me.host, self.me.pid):
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
