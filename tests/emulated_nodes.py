"""Several cluster nodes on one machine, for tests: each emulated node is a set of Linux
namespaces the tests make and remove.

  network   its own network namespace, joined to the others by veth pairs through one bridge
            namespace: node i has address 10.<net>.0.i on interface `lawa0`, and nothing else
            reaches it (traffic stays between the namespaces this module creates)
  mount     its own mount namespace: a private tmpfs on /dev/shm (node-local storage), and a hosts
            file naming every node bind-mounted on /etc/hosts; everything else (the checkout, /tmp,
            the run directories) is the machine's one filesystem, shared like a cluster's
  UTS       its own hostname, node1, node2, ...

A node is held by one sleeping process; every command "on the node" enters that process's
namespaces with nsenter. `kill()` SIGKILLs every process in the node (a node that dies loudly: the
kernel resets its connections); `cut()` takes its link down (a node that vanishes silently:
nothing answers, nothing resets).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

BRIDGE_NS = "lawa-bridge"


def missing() -> Optional[str]:
    """Why nodes cannot be emulated here, or None."""
    if os.geteuid() != 0:
        return "emulating nodes needs root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Node:
    def __init__(self, cluster: Cluster, index: int):
        self.cluster, self.index = cluster, index
        self.name = f"node{index}"
        self.netns = f"{cluster.prefix}{index}"
        self.addr = f"{cluster.subnet}.{index}"
        self.holder: Optional[subprocess.Popen] = None
        self.pid: Optional[int] = None

    def start(self, shm_mb: int) -> None:
        script = (f"mount -t tmpfs -o size={shm_mb}m tmpfs /dev/shm && mount --bind {self.cluster.hosts} /etc/hosts "
                  f"&& hostname {self.name} && echo $$ && exec sleep infinity")
        # nsenter, not `ip netns exec`: that one remounts /sys, which hides the cgroup mounts slurmd needs.
        self.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts", "--propagation", "private",
             "--fork", "bash", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.holder.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"{self.name} did not start: {line!r}")
        self.pid = int(line)

    def command(self, argv: list[str], cwd: Optional[str] = None) -> list[str]:
        """argv, run inside this node's namespaces, in `cwd` (default: the caller's)."""
        return ["nsenter", "-t", str(self.pid), "--mount", "--uts", "--net", f"--wd={cwd or os.getcwd()}", "--", *argv]

    def run(self, argv: list[str], cwd: Optional[str] = None, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(argv, cwd), **kw)

    def popen(self, argv: list[str], cwd: Optional[str] = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv, cwd), start_new_session=True, **kw)

    def processes(self) -> list[int]:
        """Every process inside this node (same UTS namespace as its holder), the holder excepted."""
        mine = os.readlink(f"/proc/{self.pid}/ns/uts")
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/uts") == mine:
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def kill(self) -> int:
        """SIGKILL everything running on the node (the node dies; its sockets are reset)."""
        victims = self.processes()
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(victims)

    def cut(self) -> None:
        """Take the node's link down: its packets are dropped, nobody is told (a silent death)."""
        _ip("-n", self.netns, "link", "set", "lawa0", "down")

    def wipe_shm(self) -> None:
        """Empty the node's /dev/shm, as a replacement node (or a rebooted one) would find it."""
        root = self.shm_path("/dev/shm")
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)

    def shm_path(self, path: str) -> str:
        """A path under this node's /dev/shm as the machine sees it (through the holder's root)."""
        return f"/proc/{self.pid}/root{path}"


class Cluster:
    def __init__(self, root: Path, nodes: int = 2, net: int = 77, shm_mb: int = 256):
        self.root = root
        self.prefix = f"lawa-n{net}-"
        self.subnet = f"10.{net}.0"
        self.shm_mb = shm_mb
        self.hosts = root / "hosts"
        self.nodes = [Node(self, i) for i in range(1, nodes + 1)]

    def start(self) -> Cluster:
        self.stop()  # leftovers of an earlier, killed run
        self.root.mkdir(parents=True, exist_ok=True)
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{n.addr} {n.name}\n" for n in self.nodes))
        bridge_ns = f"{self.prefix}br"
        _ip("netns", "add", bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for node in self.nodes:
            _ip("netns", "add", node.netns)
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("link", "add", f"{node.netns}a", "type", "veth", "peer", "name", f"{node.netns}b")
            _ip("link", "set", f"{node.netns}a", "netns", node.netns)
            _ip("link", "set", f"{node.netns}b", "netns", bridge_ns)
            _ip("-n", node.netns, "link", "set", f"{node.netns}a", "name", "lawa0")
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "lawa0")
            _ip("-n", node.netns, "link", "set", "lawa0", "up")
            _ip("-n", bridge_ns, "link", "set", f"{node.netns}b", "master", "br0")
            _ip("-n", bridge_ns, "link", "set", f"{node.netns}b", "up")
            node.start(self.shm_mb)
        return self

    def stop(self) -> None:
        """Kill every process on every node and remove the namespaces (safe to call twice)."""
        for node in self.nodes:
            if node.pid is not None:
                node.kill()
                try:
                    os.kill(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.pid = None
        listed = _ip("netns", "list", check=False).stdout.split()
        for name in listed:
            if name.startswith(self.prefix):
                # A namespace still holding a process would outlive `del`; its processes are gone above.
                _ip("netns", "del", name, check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(n.startswith(self.prefix) for n in _ip("netns", "list", check=False).stdout.split()):
            time.sleep(0.1)
