"""Slurm across two emulated nodes: one slurmd per node (NodeName node1, node2, each in its own
network, UTS and mount namespaces: tests/emulated_nodes.py) under one slurmctld on node1. The 770M
preset, shrunk on the command line to 2 nodes x 2 CPU tasks, is preempted with USR1, requeues, and
resumes on both nodes to the same per-step losses and sidecar scores as an uninterrupted run (this
replaces the single-node preemption test: everything it checked is checked here, across nodes)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

import emulated_nodes
import slurm_cluster
from averaging.sidecar.protocol import read_eval_log
from conftest import REPO, launcher_env, torchrun
from core.files import step_name
from run_checks import losses, tiny

pytestmark = pytest.mark.distributed

TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
             "--signal=USR1@5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = emulated_nodes.missing() or slurm_cluster.missing()
    if why:
        pytest.skip(f"no two-node Slurm here: {why}")
    nodes = emulated_nodes.Cluster(tmp_path_factory.mktemp("slurm_nodes"), nodes=2, net=78, shm_mb=64).start()
    try:
        slurm = slurm_cluster.MultiNodeSlurm(tmp_path_factory.mktemp("slurm_mn"), nodes).start()
        yield slurm
        slurm.stop()
    finally:
        nodes.stop()


def test_two_node_job_preempted_requeued_and_resumed_exactly(cluster, pydoc_data, tmp_path):
    steps = 32
    run = tmp_path / "preempted"
    overrides = [*tiny(pydoc_data, run, steps=steps), "parallel.zero_stage=3", f"snapshot.dir=/dev/shm/lawa-test/{run.name}",
                 "snapshot.cleanup=false"]
    env = dict(launcher_env(), PYTHON=str(Path(os.sys.executable)), REPO=str(REPO))
    start = time.monotonic()
    job = cluster.sbatch(*TWO_NODES, "slurm/pretrain_770m.sh", *overrides, env=env, cwd=str(REPO))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # signal it mid-run, past its first checkpoint
        if (run / "metrics.jsonl").exists() and max(losses(run), default=0) >= 14:
            break
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", str(job))
    time.sleep(1.0)
    try:  # a second warning during the save only repeats the request (scancel retries once it is requeued)
        cluster.run("scancel", "--signal=USR1", str(job), check=False, timeout=5)
    except subprocess.TimeoutExpired:
        pass
    info = cluster.wait(job, timeout=600)
    wall = time.monotonic() - start
    out = (run / "logs" / f"sbatch-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", out + "".join(p.read_text()[-2000:] for p in (run / "logs").glob("*.log"))
    assert int(info.get("Restarts", 0)) >= 1, info
    print(f"\ntwo-node Slurm job, preempted and requeued: {wall:.1f} s wall")
    assert info["NodeList"] == "node[1-2]" and f"rendezvous node1:{20000 + job % 20000}" in out
    first = [(run / "logs" / f"slurm-{job}-0-rank{r}.log").read_text() for r in range(4)]
    assert "world 4 = tensor 1 × data 4" in first[0]
    assert "on SIGUSR1" in first[0] and "requeued Slurm job" in first[0]
    resumed = (run / "logs" / f"slurm-{job}-1-rank0.log").read_text()
    assert "resumed from" in resumed
    stop = int(resumed.split("resumed from ")[1].split(" at step ")[1].split()[0])

    # The stop step's final snapshot was committed on both nodes: the sidecar (which needs every
    # node's part) evaluated it before the requeue.
    assert stop in {r["step"] for r in read_eval_log(str(run))}
    assert "on 2 nodes (node1: ranks 0-1, node2: ranks 2-3)" in resumed
    for node in cluster.cluster.nodes:  # each node kept its part of the last slot in its own /dev/shm
        assert os.path.isfile(node.shm_path(f"/dev/shm/lawa-test/{run.name}/{step_name(steps)}/COMMITTED"))

    whole = tmp_path / "whole"
    torchrun(4, "--job", "jobs/gpt2_770m.yaml", *tiny(pydoc_data, whole, steps=steps))
    expected, got = losses(whole), losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-6) for s in expected)
    a = {r["step"]: r for r in read_eval_log(str(whole))}
    b = {r["step"]: r for r in read_eval_log(str(run))}
    # Which steps a sidecar scores depends on how fast it keeps up (it scores the newest when behind);
    # the last step is scored in both runs, since the trainers wait for it.
    common = sorted(set(a) & set(b))
    assert steps in common, (sorted(a), sorted(b))
    for s in common:
        assert b[s]["raw_val_loss"] == pytest.approx(a[s]["raw_val_loss"], rel=1e-6)
        if a[s]["steps_averaged"] == b[s]["steps_averaged"]:
            assert b[s]["lawa_val_loss"] == pytest.approx(a[s]["lawa_val_loss"], rel=1e-6)
