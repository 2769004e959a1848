"""A real single-node Slurm (Debian's slurm-wlm + munge) started for the tests, as root, with no
systemd or cgroups: proctrack/linuxproc, task/none, state and spool under a temporary folder."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> Optional[str]:
    """Why a cluster cannot be started here, or None."""
    for tool in (*DAEMONS, "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed (apt-get install slurm-wlm munge; .ci/run does this)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd here needs root"
    return None


def _write_conf(root: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=lawa-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
JobRequeue=1
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb * 3 // 4} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        for sub in ("state", "spool"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = _write_conf(root)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> SlurmCluster:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            if not os.path.exists("/etc/munge/munge.key"):
                subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
                shutil.chown("/etc/munge/munge.key", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up: sinfo says {out!r}; logs in {self.root}")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check)

    def sbatch(self, *args: str, env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """scontrol's view of a job (state, restart count, exit code, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                            "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        # Poll scontrol rather than `sbatch --wait`, which polls slowly.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                # Slurm holds a requeued job for about two minutes; a test need not wait for that.
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.job(job_id).get('JobState')}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False, capture_output=True)
        time.sleep(0.5)
