"""The snapshot ring on a node shared by several users: each user's ring lives under a folder of
their own (/dev/shm/lawa-<uid>, 0700, files 0600); a ring folder that someone else owns is refused
before any rank writes; two users' runs with the default ring go side by side. Real launches; the
second user is `nobody`, made with setpriv."""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from averaging import slots
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, launcher_env, torchrun
from launcher.snapshot import default_ring

pytestmark = pytest.mark.distributed

NOBODY = 65534


def can_switch_user() -> str | None:
    if os.geteuid() != 0:
        return "needs root, to run a second user's job (setpriv)"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    return None


def as_nobody(cmd: list[str], read_anything: bool = False) -> list[str]:
    """`cmd` as user nobody. To run this checkout's Python wherever root installed it (/root may be
    0700), `read_anything` keeps one capability: reading and searching folders (never writing)."""
    keep = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if read_anything else []
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *keep, *cmd]


def job(data_dir: str, run: Path, *extra: str) -> list[str]:
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run}", "train.steps=8", "eval.every=0",
            "checkpoint.every=100", "snapshot.every=2", "lawa.k=2", "lawa.spacing=2", "snapshot.cleanup=false", *extra]


@pytest.mark.skipif(can_switch_user() is not None, reason=str(can_switch_user()))
def test_a_ring_folder_another_user_made_is_refused_before_anything_is_written(pydoc_data, tmp_path):
    run = tmp_path / "run"
    ring = Path(default_ring(str(run), "smoke"))
    ring.mkdir(parents=True)
    os.chown(ring, NOBODY, NOBODY)  # made in advance by another user, who could plant slots in it
    try:
        proc = subprocess.run([sys.executable, "launcher/train.py", *job(pydoc_data, run, "sidecar.enabled=true")],
                              cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error")]
        assert line == (f"config error: snapshot ring: {ring} belongs to nobody, not to root: refusing to keep "
                        f"snapshots where another user could read them or plant their own (remove it, or set "
                        f"snapshot.dir)")
        assert "model: " not in proc.stdout and not (run / "sidecar").exists()  # no engine, no sidecar
        assert os.listdir(ring) == []
    finally:
        shutil.rmtree(ring, ignore_errors=True)


@pytest.mark.skipif(can_switch_user() is not None, reason=str(can_switch_user()))
def test_two_users_runs_side_by_side_each_in_a_ring_of_its_own(pydoc_data, tmp_path):
    mine, theirs = tmp_path / "root_run", tmp_path / "nobody_home" / "run"
    theirs.parent.mkdir()
    extensions = tmp_path / "nobody_home" / "torch_extensions"  # DeepSpeed's built ops, a copy they may lock
    shutil.copytree(launcher_env()["TORCH_EXTENSIONS_DIR"], extensions)
    for path in [theirs.parent, *theirs.parent.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    env = {**launcher_env(), "HOME": str(theirs.parent), "TORCH_EXTENSIONS_DIR": str(extensions)}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
           *job(pydoc_data, theirs, "sidecar.enabled=true")]
    rings = [Path(default_ring(str(mine), "smoke")),
             Path(f"/dev/shm/lawa-{NOBODY}") / Path(default_ring(str(theirs), "smoke")).name]
    other = subprocess.Popen(as_nobody(cmd, read_anything=True), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    try:
        torchrun(2, *job(pydoc_data, mine, "sidecar.enabled=true"))
        out, _ = other.communicate(timeout=600)
        assert other.returncode == 0, out[-4000:]
        for run, ring, uid in zip((mine, theirs), rings, (0, NOBODY)):
            assert [r["step"] for r in read_eval_log(str(run))][-1] == 8  # each sidecar scored its own ring
            assert slots.committed_steps(str(ring))[-1] == 8
            for folder in (ring.parent, ring, ring / "step_00000008"):
                info = folder.stat()
                assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (uid, 0o700), folder
            for file in (ring / "step_00000008").iterdir():
                assert (file.stat().st_uid, stat.S_IMODE(file.stat().st_mode)) == (uid, 0o600), file
        # Another user can neither plant a slot in root's ring nor read root's weights.
        plant = subprocess.run(as_nobody(["touch", str(rings[0] / "step_00000000")]), capture_output=True, text=True)
        peek = subprocess.run(as_nobody(["ls", str(rings[0])]), capture_output=True, text=True)
        assert plant.returncode != 0 and peek.returncode != 0 and "Permission denied" in plant.stderr + peek.stderr
        assert not (rings[0] / "step_00000000").exists()
    finally:
        other.kill()
        for ring in rings:
            shutil.rmtree(ring, ignore_errors=True)
        with contextlib.suppress(OSError):
            rings[1].parent.rmdir()  # nobody's per-user root, when the test made it
