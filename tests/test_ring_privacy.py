"""The snapshot ring on a node shared by several users: each user's ring lives under a folder of
their own (/dev/shm/lawa-<uid>, 0700, files 0600); a ring folder that someone else owns, one under a
folder others can write, or one holding what another user planted is refused before any rank
writes; a ring replaced while the run goes on is never written or read again; a squatted default
folder gives way to a private one; two users' runs with the default ring go side by side. Real
launches; the second user is `nobody`, made with setpriv."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from averaging import slots
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, launcher_env, read_metrics, torchrun, wait_for
from launcher.ring import default_ring

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
        assert line == (f"config error: snapshot ring: {ring} belongs to nobody, not to root: they could read the "
                        f"weights or have planted their own; remove it, or choose another folder")
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


def start_alone(data_dir: str, run: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """One trainer process, no launcher: enough for what is decided before the engine is built."""
    return subprocess.run([sys.executable, "launcher/train.py", *job(data_dir, run, *extra)], cwd=REPO,
                          env=launcher_env(), capture_output=True, text=True, timeout=timeout)


def config_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error")]
    return line


@pytest.mark.skipif(can_switch_user() is not None, reason=str(can_switch_user()))
def test_a_ring_in_a_group_folder_and_what_a_group_member_planted_are_refused(pydoc_data, tmp_path):
    """snapshot.dir in a folder a group shares. A member of the group (nobody) plants a committed restart
    slot of this run and a link where the run would once have made its node mark, to a file of the
    victim's; the victim then makes the ring 0700, as the old advice said. Before, the next start took
    the planted weights and truncated the file through the link. Now: the group folder above is
    refused, and once it is the victim's alone, what was planted inside is refused; nothing is written."""
    group = tmp_path / "group"
    group.mkdir()
    ring = group / "ring"
    ring.mkdir()
    for folder in (group, ring):
        os.chown(folder, 0, NOBODY)
        folder.chmod(0o2775)
    precious = tmp_path / "precious.txt"
    precious.write_text("the victim's own file\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_id").write_text("0123456789abcdef\n")  # world-readable: what a planted slot must name
    slot = ring / "step_00000004"
    for cmd in (["mkdir", str(slot)], ["cp", str(run / "run_id"), str(slot / "manifest.json")],
                ["touch", str(slot / "COMMITTED")], ["ln", "-s", str(precious), str(ring / f".node-{socket.gethostname()}")]):
        subprocess.run(as_nobody(cmd, read_anything=True), check=True, capture_output=True)
    ring.chmod(0o700)  # "chmod go-w it": what was planted stays

    first = config_error(start_alone(pydoc_data, run, f"snapshot.dir={ring}", "snapshot.restart_every=1"))
    assert first == (f"config error: snapshot.dir: {ring} lies under {group}, which its group can write (mode 2775): "
                     f"they could move it away or put their own in its place; choose a folder only you can write")
    group.chmod(0o755)
    second = config_error(start_alone(pydoc_data, run, f"snapshot.dir={ring}", "snapshot.restart_every=1"))
    assert re.fullmatch(rf"config error: snapshot.dir: {ring} holds (a link, {ring}/\.node-\S+: someone put it there "
                        rf"to be written or read through|{ring}/\S+, which belongs to nobody: it may have been planted); "
                        rf"remove the folder, or choose another", second), second
    assert precious.read_text() == "the victim's own file\n"
    assert not (run / "metrics.jsonl").exists() and sorted(os.listdir(ring)) == sorted([slot.name, f".node-{socket.gethostname()}"])


@pytest.mark.skipif(can_switch_user() is not None, reason=str(can_switch_user()))
def test_a_ring_replaced_while_the_run_goes_on_is_never_written_or_read_again(pydoc_data, tmp_path):
    """Whoever can write the folder above a ring can rename it away and put their own in its place (the
    records that vouch for a slot sit beside its files, so they are forged as easily). The run checks
    that the path still leads to the folder it opened before every write and commit, and the sidecar
    before every read: the trainers abandon each snapshot from then on, saying why, and train to the
    end; the sidecar leaves; nothing is written into the new folder and its slot is never scored."""
    run = tmp_path / "run"
    ring = tmp_path / "ring"
    proc = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "launcher/train.py",
                             *job(pydoc_data, run, f"snapshot.dir={ring}", "train.steps=60", "sidecar.enabled=true",
                                  "sidecar.poll_seconds=0.2")],
                            cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: slots.committed_steps(str(ring)), 240, "a committed slot")
        os.rename(ring, tmp_path / "moved")
        planted = ring / "step_00000100"  # what the new folder's owner offers: a committed slot, newer than any
        newest = slots.committed_steps(str(tmp_path / "moved"))[-1]
        shutil.copytree(tmp_path / "moved" / f"step_{newest:08d}", planted)
        for path in [ring, *ring.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert max(r["step"] for r in read_metrics(run) if "loss" in r) == 60
    assert re.search(rf"snapshot of step \d+ abandoned on every node: .*{ring} is no longer the folder this run opened",
                     out), out[-4000:]
    sidecar = "".join(log.read_text() for log in (run / "sidecar").glob("rank*.log"))
    assert f"snapshot ring: {ring} is no longer the folder this run opened" in sidecar or \
        f"snapshot ring: {ring} belongs to nobody" in sidecar, sidecar[-4000:]
    assert os.listdir(ring) == [planted.name]  # nothing of the run's went into the new folder
    assert all(r["step"] != 100 for r in read_eval_log(str(run)))


def test_a_squatted_default_ring_folder_gives_way_to_a_private_one(pydoc_data, tmp_path):
    """/dev/shm/lawa-<uid> is a name anyone can predict in a folder anyone can write: another user who
    makes it first would block every run of this user's (before: exit 2 on every rank, and a folder the
    victim cannot remove). Now the ring goes to a private folder of a random name, kept in the run
    directory, with one warning; the restart finds its ring there again."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to make a folder of another user's")
    base = Path(f"/dev/shm/lawa-{os.geteuid()}")
    aside = Path(f"/dev/shm/.lawa-{os.geteuid()}-aside-{os.getpid()}")
    if base.exists():
        os.rename(base, aside)
    fallback = None
    try:
        base.mkdir(mode=0o700)
        os.chown(base, NOBODY, NOBODY)
        run = tmp_path / "run"
        first = start_alone(pydoc_data, run, "snapshot.restart_every=1", "train.stop_at=4")
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        fallback = Path((run / "ring_base").read_text().strip())
        assert re.fullmatch(rf"/dev/shm/lawa-{os.geteuid()}-[0-9a-f]{{16}}", str(fallback))
        assert (f"{base} belongs to nobody, not to root; the ring goes to {fallback} instead (a private folder of "
                f"this user's, its name kept for this run's restarts in {run / 'ring_base'})") in first.stdout + first.stderr
        ring = Path(default_ring(str(run), "smoke", str(fallback)))
        assert slots.committed_steps(str(ring))[-1] == 4 and stat.S_IMODE(fallback.stat().st_mode) == 0o700
        again = start_alone(pydoc_data, run)  # the restart: its ring is where the first run left it
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert (run / "ring_base").read_text().strip() == str(fallback) and slots.committed_steps(str(ring))[-1] == 8
        assert [p for p in Path("/dev/shm").iterdir() if p.name.startswith(f"lawa-{os.geteuid()}-")] == [fallback]
        assert os.listdir(base) == []  # nothing of the run's in the squatted folder
    finally:
        shutil.rmtree(base, ignore_errors=True)
        if fallback is not None:
            shutil.rmtree(fallback, ignore_errors=True)
        if aside.exists():
            os.rename(aside, base)
