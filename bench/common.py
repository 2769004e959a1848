"""What the benchmarks share: running real launcher jobs (torchrun on this machine's CPUs),
not timing against other jobs, and a header describing the machine."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BUSY_PATTERNS = ("launcher/train.py", "averaging.sidecar")


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def ms(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f}"


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ---------------------------------------------------------------------------------------------
# not timing against other jobs


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        chain.append(pid)
    return chain


def foreign_jobs() -> list[int]:
    """Training or sidecar processes on this machine that this script did not start."""
    me, found = os.getpid(), set()
    for pattern in BUSY_PATTERNS:
        out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
        for pid in map(int, out.split()):
            if pid != me and me not in _ancestors(pid):
                found.add(pid)
    return sorted(found)


def wait_until_idle(timeout_s: float) -> float:
    """Poll every 5 s until no foreign job runs; returns the seconds waited."""
    start = time.monotonic()
    busy = foreign_jobs()
    if busy:
        print(f"  waiting for other jobs to finish (pids {busy}) ...", flush=True)
    while busy:
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"other training jobs (pids {busy}) still run after {timeout_s:.0f}s; "
                             f"not timing against them")
        time.sleep(5)
        busy = foreign_jobs()
    return time.monotonic() - start


class Measurement:
    """Waits for an idle machine, then samples for foreign jobs while the measurement runs."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, timeout_s
        self.seen: set[int] = set()
        self._stop = threading.Event()

    def __enter__(self) -> Measurement:
        self.waited_s = wait_until_idle(self.timeout_s)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            self.seen.update(foreign_jobs())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.seen:
            print(f"  WARNING: {self.name} overlapped other jobs (pids {sorted(self.seen)}): contended", flush=True)

    @property
    def contended(self) -> bool:
        return bool(self.seen)


# ---------------------------------------------------------------------------------------------
# running real jobs


def child_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    # As tests/conftest.py: one JIT-extension cache per environment (DeepSpeed's CPU comm op).
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *args]


def show_cmd(cmd: list[str]) -> str:
    prefix = f"OMP_NUM_THREADS=1 TORCH_EXTENSIONS_DIR={child_env()['TORCH_EXTENSIONS_DIR']}"
    return prefix + " " + " ".join(shlex.quote(c) for c in cmd)


def run_logged(cmd: list[str], log_path: Path, commands: list[str], cwd: Path = REPO) -> float:
    """Runs a command from the repo root (or another checkout's) with its output in log_path;
    returns its wall time."""
    commands.append(show_cmd(cmd) if cwd == REPO else f"(cd {shlex.quote(str(cwd))} && {show_cmd(cmd)})")
    print(f"  $ {commands[-1]}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(), stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text()[-6000:]
        raise SystemExit(f"command exited {proc.returncode} after {wall:.0f}s:\n{commands[-1]}\n--- {log_path} (tail)\n{tail}")
    return wall


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "nproc": os.cpu_count(), "cpu": cpu, "mem_gib": mem, "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": metadata.version("deepspeed"), "git_commit": commit}
