"""Slurm launch, rank discovery through Slurm and mpirun, preemption and exact resume, on a real
single-node Slurm (slurm-wlm + munge, installed by .ci/run) started by the fixture below."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, launcher_env
from run_checks import losses
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.distributed

# The 770M preset, shrunk to a tiny CPU model on 2 tasks.
SHRINK = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
          "--signal=USR1@5"]


def submit(cluster: SlurmCluster, args: list[str], tmp_path: Path) -> int:
    env = dict(launcher_env(), PYTHON=str(Path(os.sys.executable)), REPO=str(REPO))
    return cluster.sbatch(*SHRINK, "slurm/pretrain_770m.sh", *args, env=env, cwd=str(REPO))


def test_a_config_error_under_sbatch_is_one_line_in_the_submit_directory(slurm, tmp_path):
    env = dict(launcher_env(), PYTHON=str(Path(os.sys.executable)), REPO=str(REPO))
    job = slurm.sbatch(*SHRINK, str(REPO / "slurm/pretrain.sh"), "nosuch.key=1", env=env, cwd=str(tmp_path))
    assert slurm.wait(job, timeout=120)["JobState"] == "FAILED"
    out = (tmp_path / "runs" / f"slurm-{job}.out").read_text()
    assert out.startswith(f"job {job}: config error: unknown key 'nosuch'") and len(out.splitlines()) == 1


def test_mpirun_ranks_train(pydoc_data, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun here (apt-get install openmpi-bin; .ci/run does this)")
    run = tmp_path / "mpi"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(launcher_env(), MASTER_PORT=str(port), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "-x", "MASTER_PORT", "-x", "TORCH_EXTENSIONS_DIR",
                           "-x", "OMP_NUM_THREADS", os.sys.executable, "launcher/train.py", "--job", "jobs/smoke.yaml",
                           f"data.dir={pydoc_data}", f"run_dir={run}", "train.steps=4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2 = tensor 1 × data 2" in proc.stdout
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_rank_discovery_reads_each_launcher():
    from core.distributed import rank_env

    assert rank_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "7"}) \
        .__dict__ == dict(rank=3, world_size=4, local_rank=1, master_addr="h", master_port=7, source="torchrun")
    slurm_env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
                 "MASTER_ADDR": "node1"}
    assert rank_env(slurm_env).__dict__ == dict(rank=5, world_size=8, local_rank=1, master_addr="node1",
                                                master_port=21234, source="slurm")
    mpi_env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert rank_env(mpi_env).__dict__ == dict(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1",
                                              master_port=29500, source="mpi")
    assert rank_env({}).source == "single"


def test_gstack_stages_run_as_dependent_slurm_jobs(slurm, pydoc_data, tmp_path):
    small, grown = tmp_path / "small", tmp_path / "grown"
    env = dict(launcher_env(), **slurm.env, PYTHON=str(Path(os.sys.executable)), REPO=str(REPO),
               SMALL_JOB="jobs/smoke.yaml", GROWN_JOB="jobs/smoke.yaml",
               SMALL_OVERRIDES=f"data.dir={pydoc_data} run_dir={small} train.steps=4 checkpoint.every=4 eval.every=0",
               GROWN_OVERRIDES=f"data.dir={pydoc_data} run_dir={grown} model.n_layer=4 growth.from_run={small} "
                               "growth.factor=2 train.steps=4 eval.every=0")
    proc = subprocess.run(["bash", "slurm/gstack_two_stage.sh", *SHRINK[:-1]],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = [int(w.rstrip(";")) for w in proc.stdout.split() if w.rstrip(";").isdigit()][:2]
    assert f"afterok:{first}" in slurm.job(second).get("Dependency", "")  # asked while the first still runs
    for job, run in ((first, small), (second, grown)):
        assert slurm.wait(job, timeout=300)["JobState"] == "COMPLETED", (run / "logs" / f"sbatch-{job}.out").read_text()
    assert "initialised by growing" in (grown / "logs" / f"slurm-{second}-0-rank0.log").read_text()
    assert slurm.job(second)["StartTime"] >= slurm.job(first)["EndTime"]
    assert sorted(losses(grown)) == [1, 2, 3, 4]
