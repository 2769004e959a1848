"""Shared fixtures: one prepared copy of the embedded corpus, a runner for real launchers, and a check
that no test module leaves anything in /dev/shm."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.files import read_jsonl
from core.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def launcher_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # One JIT-extension cache per environment: DeepSpeed builds its CPU comm op once (~35 s), not per test.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_launcher(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def torchrun(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    return run_launcher([str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
                         "launcher/train.py", *args], **kw)


def lawa_train(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    """The front command, as users start a run: it checks the job, prepares its data dir when it is
    not prepared, and becomes `torchrun --standalone` with the same arguments."""
    return run_launcher([sys.executable, "-m", "launcher.run", f"--nproc-per-node={nproc}", *args], **kw)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(RunDir(str(run_dir)).metrics)


def step_losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss, as last logged (a resumed run logs the steps it trains again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="session")
def pydoc_data(tmp_path_factory) -> str:
    """The embedded corpus prepared once per test session with the jobs' tokenizer settings."""
    from launcher.config import load_job
    from launcher.data import prepare

    job = load_job(REPO / "jobs/smoke.yaml", [f"data.dir={tmp_path_factory.mktemp('pydoc')}"])
    prepare(job.data, progress=False)
    return job.data.dir


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real single-node Slurm for the session (tests/slurm_cluster.py), or a skip saying what is missing."""
    from slurm_cluster import SlurmCluster, missing

    why = missing()
    if why:
        pytest.skip(f"no Slurm here: {why}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every process under it (its workers run in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, alive


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


SHM = "/dev/shm"
USER_SHM_FOLDER = re.compile(r"^/dev/shm/lawa-\d+(-[0-9a-f]+)?$")  # a user's folder for rings, which runs keep


def shm_entries() -> set[str]:
    """What /dev/shm holds: its entries, and those of the users' ring folders."""
    if not os.path.isdir(SHM):
        return set()
    found = set()
    for name in os.listdir(SHM):
        path = os.path.join(SHM, name)
        found.add(path)
        if name.startswith("lawa-") and os.path.isdir(path) and not os.path.islink(path):
            found.update(os.path.join(path, inner) for inner in os.listdir(path))
    return found


@pytest.fixture(scope="module", autouse=True)
def leaves_nothing_in_shm(request):
    """A module's runs, killed ones included, leave nothing in /dev/shm: what one left is removed and
    fails the module (an empty per-user folder, which the product keeps, is only removed)."""
    before = shm_entries()
    yield
    left = sorted(shm_entries() - before)
    stale = [path for path in left if not USER_SHM_FOLDER.match(path)]
    for path in stale:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    for path in left:
        if USER_SHM_FOLDER.match(path) and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    if stale:
        pytest.fail(f"{request.module.__name__} left in /dev/shm: {', '.join(stale)}")
