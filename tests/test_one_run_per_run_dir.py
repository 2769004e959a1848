"""One run per run directory, and no orphans: a second launch on a run directory in use is one line
naming its holder, whichever way it is started; when only torchrun's agent is killed (kill -9), its
workers and their sidecar stop within seconds, saying why, instead of training on unsupervised; the
same command then takes the dead run's lock over, resumes from the ring in /dev/shm, and leaves
nothing stale there. Real torchrun launches on gloo."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from averaging import slots
from conftest import BIN, REPO, kill_tree, launcher_env, run_launcher, step_losses, wait_for
from launcher.ring import default_ring

pytestmark = pytest.mark.distributed


def job(data_dir: str, run: Path, *extra: str) -> list[str]:
    """The smoke job, its ring in the default place (/dev/shm), a restart point at every snapshot."""
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run}", "train.steps=400", "eval.every=0",
            "checkpoint.every=1000", "snapshot.every=4", "snapshot.restart_every=1", "lawa.k=2", "lawa.spacing=4",
            "logging.every=1", "sidecar.enabled=true", "sidecar.poll_seconds=0.2", *extra]


def trainers_and_sidecars(agent: psutil.Process) -> list[psutil.Process]:
    found = [p for p in agent.children(recursive=True)
             if "launcher/train.py" in " ".join(p.cmdline()) or "averaging.sidecar" in " ".join(p.cmdline())]
    return found


def test_a_run_dir_in_use_is_refused_and_a_killed_agent_leaves_no_orphans(pydoc_data, tmp_path):
    run = tmp_path / "run"
    ring = Path(default_ring(str(run), "smoke"))
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
                                  *job(pydoc_data, run)], cwd=REPO, env=launcher_env(), stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: slots.committed_steps(str(ring)), 240, "a committed restart slot in /dev/shm")
        agent = psutil.Process(first.pid)
        workers = wait_for(lambda: (lambda w: w if len(w) == 4 else None)(trainers_and_sidecars(agent)), 120,
                           "two trainers and their two sidecar ranks")
        holder = next(p for p in workers if "launcher/train.py" in " ".join(p.cmdline())
                      and p.environ().get("RANK") == "0")

        # A second launch on the same run directory: the front command refuses before any rank starts ...
        again = run_launcher([sys.executable, "-m", "launcher.run", "--nproc-per-node=2", *job(pydoc_data, run)],
                             check=False)
        in_use = (f"run_dir {run} is in use by pid {holder.pid} on {socket.gethostname()} (smoke), which is still "
                  f"running: stop it first (or choose another run_dir)")
        assert again.returncode == 2 and again.stderr.strip() == f"config error: {in_use}", again.stderr
        # ... and torchrun started directly is refused by the ranks, before its ring or data are touched.
        direct = run_launcher([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
                               *job(pydoc_data, run)], check=False)
        assert direct.returncode != 0 and f"config error: {in_use}" in direct.stderr, direct.stderr[-3000:]

        # Only the agent dies: its workers (in sessions of their own) and their sidecar stop within seconds.
        step_at_kill = max(step_losses(run))
        agent.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        killed_at = time.monotonic()
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
        print(f"\nagent killed: its {len(gone)} workers and sidecar ranks gone {time.monotonic() - killed_at:.1f} s later")
        said = log.read_text()
        assert re.search(rf"\[rank 0\] torchrun \(pid {first.pid}\) is gone: this trainer \(pid {holder.pid}\) stops now",
                         said), said[-3000:]
        # Each rank names the cause, not what followed from it (the agent's store gone, a peer gone).
        assert re.search(rf"\[rank 1\] torchrun \(pid {first.pid}\) is gone", said) and "lost contact" not in said, \
            said[-3000:]
        assert max(step_losses(run)) < step_at_kill + 50  # it did not train on for long (before: 200 steps in 20 s)
    finally:
        kill_tree(first.pid)
        for p in psutil.process_iter(["cmdline"]):
            if str(run) in " ".join(p.info["cmdline"] or []):
                p.kill()

    # The same command again: the dead run's lock is taken over, the run resumes from the ring in
    # /dev/shm and ends; what the killed run left there is reused or removed.
    resumed = run_launcher([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
                            *job(pydoc_data, run, f"train.steps={max(step_losses(run)) + 8}")])
    out = resumed.stdout + resumed.stderr
    assert f"took over {run}/.lock: its holder, pid {holder.pid} on {socket.gethostname()} (smoke), is gone" in out, out[-3000:]
    assert re.search(rf"resumed from the ring's restart slot of step \d+ in {ring}", out), out[-3000:]
    assert not ring.exists()  # the run ended normally: its node-local ring is freed (snapshot.cleanup)
    assert not (run / ".lock").exists()
