"""A real Slurm (Debian's slurm-wlm + munge) started for the tests, as root, with no systemd or
cgroups: proctrack/linuxproc, task/none, state and spool under a temporary folder. Single-node on
this machine's hostname (`SlurmCluster`), or one slurmd per emulated node under one slurmctld on
the first (`MultiNodeSlurm`, on tests/emulated_nodes.py)."""
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


def _write_conf(root: Path, nodes: Optional[list[tuple[str, str]]] = None) -> Path:
    """nodes: (name, address) of each node; default this machine's hostname on loopback. The
    controller runs on the first."""
    nodes = nodes or [(socket.gethostname().split(".")[0], "127.0.0.1")]
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // len(nodes)
    node_lines = "".join(f"NodeName={name} NodeAddr={addr} CPUs={os.cpu_count()} RealMemory={memory_mb * 3 // 4} "
                         f"State=UNKNOWN\n" for name, addr in nodes)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=lawa-test
SlurmctldHost={nodes[0][0]}({nodes[0][1]})
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
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort=16817
SlurmdPort=16818
{node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


def start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["/usr/sbin/mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)


class SlurmCluster:
    """One slurmctld and one slurmd on this machine's hostname, on loopback."""

    def __init__(self, root: Path, nodes: Optional[list[tuple[str, str]]] = None):
        self.root = root
        (root / "state").mkdir(parents=True, exist_ok=True)
        self.conf = _write_conf(root, nodes)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.node_count = len(nodes or [None])

    def command(self, argv: list[str], node: int = 0, cwd: Optional[str] = None) -> list[str]:
        """argv as run on node `node` (here, every node is this machine)."""
        return argv

    def start_daemons(self) -> None:
        (self.root / f"spool-{socket.gethostname().split('.')[0]}").mkdir(exist_ok=True)
        subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], env=self.env, check=True)
        subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf)], env=self.env, check=True)

    def start(self, timeout: float = 60) -> SlurmCluster:
        start_munge()
        self.start_daemons()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == self.node_count and all(s in ("idle", "mixed", "allocated") for s in states):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"Slurm did not come up: sinfo says {states!r}; logs in {self.root}")

    def run(self, *cmd: str, check: bool = True, timeout: Optional[float] = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(list(cmd)), env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def sbatch(self, *args: str, env: Optional[dict] = None, cwd: Optional[str] = None) -> int:
        out = subprocess.run(self.command(["sbatch", "--parsable", *args], cwd=cwd), env={**self.env, **(env or {})},
                             cwd=cwd,
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
        hurried = False
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            held = info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime"
            if held and not hurried:
                # Slurm holds a requeued job for about two minutes; a test need not wait for that. Not
                # "now": slurmd refuses a launch in the same second as the kill that revoked the job's
                # credential ("Job credential revoked"), and the job ends FAILED.
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2", check=False)
            hurried = held
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.job(job_id).get('JobState')}")

    def stop(self) -> None:
        self.run("scancel", "--full", "--user=root", check=False)
        for pid_file in [*self.root.glob("slurmd-*.pid"), self.root / "slurmctld.pid"]:
            if pid_file.exists():
                subprocess.run(["kill", pid_file.read_text().strip()], check=False, capture_output=True)
        time.sleep(0.5)


class MultiNodeSlurm(SlurmCluster):
    """One slurmd inside each emulated node (its own hostname, address and /dev/shm), the
    controller inside the first; clients run on the first node too."""

    def __init__(self, root: Path, cluster):
        self.cluster = cluster
        super().__init__(root, [(n.name, n.addr) for n in cluster.nodes])

    def command(self, argv: list[str], node: int = 0, cwd: Optional[str] = None) -> list[str]:
        return self.cluster.nodes[node].command(argv, cwd or str(self.root))

    def start_daemons(self) -> None:
        subprocess.run(self.command(["/usr/sbin/slurmctld", "-f", str(self.conf)]), env=self.env, check=True)
        for i, node in enumerate(self.cluster.nodes):
            (self.root / f"spool-{node.name}").mkdir(exist_ok=True)
            subprocess.run(self.command(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", node.name], i),
                           env=self.env, check=True)
