"""Two emulated nodes (tests/emulated_nodes.py: own network, hostname and /dev/shm each, one shared
filesystem) running real multi-node torchrun jobs: one `torchrun --nnodes 2 --nproc_per_node 2`
agent per node, c10d rendezvous on node1, the LAWA sidecar on, snapshots in each node's own
/dev/shm. Checked against a single-node run of the same job, against DeepSpeed's zero_to_fp32, and
against transformers; then what happens when a node dies loudly or silently, when one node's
sidecar dies, and when one node's /dev/shm is full."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import emulated_nodes
from averaging import slots
from averaging.lawa import average_state_dicts
from averaging.sidecar.protocol import read_eval_log
from conftest import BIN, REPO, launcher_env, read_metrics, torchrun, wait_for
from core.files import step_name
from core.flat_layout import views
from core.zero_folder import consolidate
from run_checks import hf_val_loss

pytestmark = pytest.mark.distributed

SHM = "/dev/shm/lawa-test"  # the same path on every node, a different tmpfs on each


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    why = emulated_nodes.missing()
    if why:
        pytest.skip(f"cannot emulate nodes here: {why}")
    cluster = emulated_nodes.Cluster(tmp_path_factory.mktemp("nodes"), nodes=2, net=77, shm_mb=64).start()
    yield cluster
    cluster.stop()


@pytest.fixture(autouse=True)
def clean_nodes(nodes):
    """Nothing a test started outlives it on any node."""
    yield
    for node in nodes.nodes:
        node.kill()
        subprocess.run(["ip", "-n", node.netns, "link", "set", "lawa0", "up"], check=False)


def job(data_dir: str, run: Path, *extra: str) -> list[str]:
    return ["--job", "jobs/smoke.yaml", f"data.dir={data_dir}", f"run_dir={run}", f"snapshot.dir={SHM}/{run.name}",
            "train.steps=16", "eval.every=8", "checkpoint.every=8", "snapshot.every=4", "snapshot.slots=8",
            "lawa.k=3", "lawa.spacing=4", "snapshot.cleanup=false", "sidecar.enabled=true",
            "sidecar.poll_seconds=0.2", *extra]


def on_nodes(cluster, args: list[str], run_id: str, log_dir: Path) -> list[subprocess.Popen]:
    """One torchrun agent per node, rendezvous (c10d) on node1; logs in log_dir/<node>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    # Whatever order the agents join in, torch's c10d rendezvous ranks them by node name (sorted):
    # node1 holds ranks 0-1 (check_node_local_slots checks the placement).
    for node in cluster.nodes:
        cmd = [str(BIN / "torchrun"), "--nnodes", str(len(cluster.nodes)), "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{cluster.nodes[0].name}:29400", "--rdzv_id", run_id,
               "launcher/train.py", *args]
        with open(log_dir / f"{node.name}.log", "w") as log:
            procs.append(node.popen(cmd, cwd=str(REPO), env=launcher_env(), stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def run_on_nodes(cluster, args: list[str], run_id: str, log_dir: Path, timeout: float = 600) -> None:
    codes = wait_all(on_nodes(cluster, args, run_id, log_dir), timeout)
    logs = "".join((log_dir / f"{n.name}.log").read_text()[-3000:] for n in cluster.nodes)
    assert codes == [0] * len(codes), logs


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def node_slots(node, run: Path) -> Path:
    return Path(node.shm_path(f"{SHM}/{run.name}"))


def gathered(cluster, run: Path, step: int, into: Path) -> Path:
    """One slot's files from every node, in one folder (what a user would rsync together)."""
    folder = into / step_name(step)
    for node in cluster.nodes:
        shutil.copytree(node_slots(node, run) / step_name(step), folder, dirs_exist_ok=True)
    return folder


def check_node_local_slots(cluster, run: Path, tp: int) -> list[int]:
    """Each node holds only its own ranks' files of every slot, committed by it, checksums intact;
    returns the steps committed on every node."""
    placement = {"node1": [0, 1], "node2": [2, 3]}
    common = None
    for node in cluster.nodes:
        root = node_slots(node, run)
        steps = slots.committed_steps(str(root))
        common = set(steps) if common is None else common & set(steps)
        mine = placement[node.name]
        for step in steps:
            path = str(root / step_name(step))
            manifest = slots.read_manifest(path)
            assert (manifest.node, manifest.nodes) == (node.name, placement), manifest
            ranks = {int(m.group(1)) * tp + int(m.group(2)) for f in os.listdir(path)
                     if (m := re.match(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_", f))}
            assert ranks == set(mine), (node.name, step, sorted(os.listdir(path)))
            for rank in mine:
                slots.read_shard(path, rank // tp, rank % tp, manifest)  # checksum-verified
                slots.read_model_states(path, rank // tp, rank % tp, manifest)
    return sorted(common)


def check_lawa_best(cluster, run: Path, tmp: Path) -> dict:
    """lawa_best is one committed slot on shared storage whose consolidation equals the mean of
    zero_to_fp32 consolidations of its source slots gathered from both nodes; returns its eval record."""
    (best,) = slots.committed_steps(str(run / "lawa_best"))
    manifest = slots.read_manifest(str(run / "lawa_best" / step_name(best)))
    assert manifest.node is None and len([f for f in manifest.files if f.endswith("optim_states.pt")]) == 4
    sources = [consolidate(str(gathered(cluster, run, s, tmp / "gathered"))) for s in manifest.steps_averaged]
    got = consolidate(str(run / "lawa_best" / step_name(best)))
    want = average_state_dicts(sources)
    assert max((got[k] - want[k]).abs().max().item() for k in want) <= 1e-6
    (record,) = [r for r in read_eval_log(str(run)) if r["step"] == best]
    assert record["best"] and record["k"] == len(manifest.steps_averaged) >= 2
    return record


def test_two_nodes_tp2_dp2_with_the_sidecar(nodes, pydoc_data, tmp_path):
    run = tmp_path / "tp2"
    start = time.monotonic()
    run_on_nodes(nodes, job(pydoc_data, run, "parallel.tensor=2", "sidecar.export_hf=true"), "tp2", tmp_path / "logs")
    print(f"\n2 nodes x 2 ranks, TP=2 x DP=2, sidecar on: {time.monotonic() - start:.1f} s")
    node1 = (tmp_path / "logs" / "node1.log").read_text()
    assert "world 4 = tensor 2 × data 2" in node1 and "spans nodes" not in node1  # each TP group on one node
    reference = tmp_path / "one_node"
    torchrun(4, *job(pydoc_data, reference, "parallel.tensor=2", "snapshot.every=0", "sidecar.enabled=false"))
    expected, got = losses(reference), losses(run)
    assert sorted(got) == list(range(1, 17))
    assert all(got[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-7) for s in expected)
    committed = check_node_local_slots(nodes, run, tp=2)
    record = check_lawa_best(nodes, run, tmp_path)
    assert hf_val_loss(run, run / "lawa_best_hf") == pytest.approx(record["lawa_val_loss"], rel=1e-4)
    # The raw slot is scored as the trainers scored their own weights at that step.
    trainer_val = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert {r["step"]: r for r in read_eval_log(str(run))}[16]["raw_val_loss"] == pytest.approx(trainer_val[16], rel=1e-6)

    # Replicated parameters are bitwise equal in the two tensor-parallel ranks' shards (both on node1).
    slot = str(node_slots(nodes.nodes[0], run) / step_name(16))
    manifest = slots.read_manifest(slot)
    layout = manifest.tensor_parallel_layout  # (a ZeRO-1 slot: auto chose it on these CPUs)
    parts = [{name: view for name, (view, _) in views(slots.read_shard(slot, 0, t)[0], manifest.layout(), 0).items()}
             for t in (0, 1)]
    replicated = [n for n in parts[0] if n not in layout]
    assert replicated and all(torch.equal(parts[0][n], parts[1][n]) for n in replicated)
    # Offline averaging of TP slots (gathered from both nodes) writes the same layout and consolidates
    # to the same average as the consolidated slots'.
    sources = [gathered(nodes, run, s, tmp_path / "gathered") for s in committed[-3:]]
    out_dir = tmp_path / "offline"
    subprocess.run([str(BIN / "python"), "-m", "averaging.offline", "--out", str(out_dir), *map(str, sources)],
                   cwd=REPO, env=launcher_env(), check=True, capture_output=True)
    reference = average_state_dicts([consolidate(str(p)) for p in sources])
    offline = consolidate(str(out_dir))
    assert max((offline[k] - reference[k]).abs().max().item() for k in reference) <= 1e-6

    # A node-local slot alone cannot be consolidated, averaged or exported: one line says where the rest is.
    slot = f"{SHM}/{run.name}/{step_name(16)}"
    for tool in (["-m", "averaging.consolidate", slot, "--out", str(tmp_path / "x.pt")],
                 ["-m", "models.hf", "export", slot, "--out", str(tmp_path / "hf_x"), "--run-dir", str(run)],
                 ["-m", "averaging.offline", "--out", str(tmp_path / "avg"), slot]):
        proc = nodes.nodes[0].run([str(BIN / "python"), *tool], cwd=str(REPO), env=launcher_env())
        assert proc.returncode == 2, proc.stdout + proc.stderr
        line = proc.stderr.strip()
        assert "\n" not in line and "ranks 0-1 (node1) only" in line and "ranks 2-3 on node2" in line, line


def fault_job(data_dir: str, run: Path, *extra: str) -> list[str]:
    return job(data_dir, run, "train.steps=24", "checkpoint.every=10", "eval.every=0", "logging.every=2",
               "sidecar.enabled=false", "snapshot.every=0", "parallel.heartbeat_timeout_s=10", *extra)


def checkpointed(run: Path, step: int):
    return lambda: (run / "checkpoints" / step_name(step) / "run_state.json").exists()


def test_a_node_killed_mid_run_stops_the_other_with_one_line_and_the_same_command_resumes(nodes, pydoc_data, tmp_path):
    run = tmp_path / "killed"
    args = fault_job(pydoc_data, run, "parallel.zero_stage=2")
    procs = on_nodes(nodes, args, "killed", tmp_path / "logs")
    wait_for(checkpointed(run, 10), 300, "the first checkpoint")
    killed_at = time.monotonic()
    assert nodes.nodes[1].kill() > 0
    assert wait_all(procs[:1], 120)[0] != 0
    print(f"\nnode2 killed: node1 gone {time.monotonic() - killed_at:.1f} s later")
    log = (tmp_path / "logs" / "node1.log").read_text()
    ours = [line for line in log.splitlines() if "lost contact with" in line]
    assert len(ours) == 2 and all("ranks 2-3 on node2" in line for line in ours), log[-3000:]
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log  # no raw gloo traceback
    stopped = max(losses(run))
    assert stopped < 24

    run_on_nodes(nodes, args, "killed-resume", tmp_path / "logs-resume")
    resumed = [r for r in read_metrics(run) if r.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] >= 10 and max(losses(run)) == 24


def test_a_node_that_vanishes_silently_stops_the_job_within_the_heartbeat_bound(nodes, pydoc_data, tmp_path):
    run = tmp_path / "vanished"
    procs = on_nodes(nodes, fault_job(pydoc_data, run), "vanished", tmp_path / "logs")
    try:
        wait_for(checkpointed(run, 10), 300, "the first checkpoint")
        cut_at = time.monotonic()
        nodes.nodes[1].cut()
        assert wait_all(procs[:1], 120)[0] != 0
        took = time.monotonic() - cut_at
        print(f"\nnode2 cut off: node1 gone {took:.1f} s later (heartbeat timeout 10 s)")
        assert took < 10 + 2 * 2.5 + 15  # timeout + two beats, plus the slack of 8 processes on 2 cores
        log = (tmp_path / "logs" / "node1.log").read_text()
        assert "rank 2 on node2 stopped answering (no heartbeat for" in log, log[-3000:]
        # The cut-off node's trainers cannot reach the rendezvous store on node1, and stop too (its
        # torchrun agent, cut off from the rendezvous, is left for the node's own end to take).
        node2_log = tmp_path / "logs" / "node2.log"
        wait_for(lambda: "lost contact with the rendezvous store at node1" in node2_log.read_text(), 60,
                 "node2's trainers to give up")
    finally:
        nodes.nodes[1].kill()


def test_one_nodes_sidecar_killed_and_one_nodes_shm_full(nodes, pydoc_data, tmp_path):
    """The sidecar group is restarted when one node's sidecar dies; a snapshot that one node
    cannot write (its /dev/shm is full) is abandoned on every node, and training goes on."""
    run = tmp_path / "faults"
    args = job(pydoc_data, run, "train.steps=36", "logging.every=2", "eval.every=0", "checkpoint.every=100",
               "snapshot.every=2", "snapshot.slots=4", "lawa.k=2", "lawa.spacing=2")
    procs = on_nodes(nodes, args, "faults", tmp_path / "logs")
    node2 = nodes.nodes[1]
    filler = node2.shm_path("/dev/shm/filler")
    log = tmp_path / "logs" / "node1.log"
    try:
        ring = node_slots(node2, run)
        wait_for(lambda: ring.is_dir() and any(ring.glob("step_*")), 300, "a first snapshot on node2")
        # Fill node2's /dev/shm: its next snapshot write fails (within 2 steps of the first one,
        # however fast the trainers go: a ZeRO-1 step of this model takes a tenth of a second).
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
        abandoned = wait_for(lambda: re.search(r"snapshot of step (\d+) abandoned on every node: [^(]*node2 could not "
                                               r"(write it|commit its part) \(.*No space left", log.read_text()),
                             120, "an abandoned snapshot")
        step = int(abandoned.group(1))
        # At once, long before the ring would recycle that step (4 slots, one every 2 steps): no node
        # keeps any part of it, node1's written (or committed) part included.
        wait_for(lambda: not any((node_slots(node, run) / step_name(step)).exists() for node in nodes.nodes), 10,
                 f"step {step}'s parts removed on every node")
        os.remove(filler)
        sidecars = [pid for pid in node2.processes()
                    if "averaging.sidecar" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(sidecars) == 2
        for pid in sidecars:
            os.kill(pid, 9)
        # The trainers vote on the sidecar's liveness at every log step, the last one included: it
        # is restarted even when the kill comes in the last steps.
        wait_for(lambda: "generation 1" in log.read_text(), 120, "the sidecar's restart")
        assert wait_all(procs, 300) == [0, 0], log.read_text()[-3000:]
    finally:
        if os.path.exists(filler):
            os.remove(filler)
    assert max(losses(run)) == 36
    records = read_eval_log(str(run))
    assert records[-1]["step"] == 36 and any(r["step"] > step for r in records)
    assert "sidecar died" in log.read_text()


def restart_job(data_dir: str, run: Path, *extra: str) -> list[str]:
    """Restart slots at steps 8, 16, 24 (every 2nd snapshot), copied to the other node; no checkpoint
    before the end."""
    return job(data_dir, run, "train.steps=32", "eval.every=0", "checkpoint.every=1000", "logging.every=1",
               "sidecar.enabled=false", "snapshot.restart_every=2", "snapshot.replicate=buddy", *extra)


def buddy_copy(node, run: Path, of: str, at_least: int):
    root = node_slots(node, run)
    return lambda: any(n == of and s >= at_least for n, s, _ in slots.buddy_copies(str(root)))


def kill_after_buddy_copy(cluster, args: list[str], run: Path, logs: Path) -> int:
    """Start the job, kill both nodes once node1 holds node2's part of a restart slot, empty node2's
    /dev/shm (a replacement node); returns the newest step node1 holds a copy of."""
    procs = on_nodes(cluster, args, run.name, logs)
    try:
        wait_for(buddy_copy(cluster.nodes[0], run, "node2", 8), 300, "node2's part of a restart slot on node1")
    finally:
        for node in reversed(cluster.nodes):
            node.kill()
        wait_all(procs, 60)
    assert max(losses(run)) < 32
    cluster.nodes[1].wipe_shm()
    return max(s for n, s, _ in slots.buddy_copies(str(node_slots(cluster.nodes[0], run))) if n == "node2")


def test_a_replaced_node_restarts_from_its_buddys_copy_of_the_ring_exactly(nodes, pydoc_data, tmp_path):
    """snapshot.replicate=buddy: each node's part of every restart slot is copied to the other node
    while training runs. Both nodes' processes are killed once node1 holds node2's part of a restart
    slot, and node2's /dev/shm is emptied (a replacement node): the same command restores node2's
    part from node1's copy, resumes from that restart slot, and trains on to the losses of an
    uninterrupted run, bit for bit. With node1's copy damaged too, the run says so in one line and
    falls back (here: no checkpoint yet, so it starts over), and never uses the damaged copy."""
    reference = tmp_path / "uninterrupted"
    torchrun(4, *restart_job(pydoc_data, reference, "parallel.zero_stage=1", "snapshot.replicate=none",
                             f"snapshot.dir={reference / 'snaps'}"))  # on this machine: not in its /dev/shm
    expected = losses(reference)

    run = tmp_path / "replaced"
    args = restart_job(pydoc_data, run, "parallel.zero_stage=1")
    copied = kill_after_buddy_copy(nodes, args, run, tmp_path / "logs")
    # node1 kept node2's part as node2 committed it (files, checksums, its manifest), as a slot
    # folder of its own.
    copy = slots.read_manifest(str(node_slots(nodes.nodes[0], run) / slots.BUDDY / "node2" / step_name(copied)))
    assert copy.node == "node2" and copy.restart and copy.run == (run / "run_id").read_text().strip() and {slots.moments_file(2, 0), slots.moments_file(3, 0)} <= set(copy.files)
    # What a copy cut off by the kill leaves (its receiver gone mid-transfer): a staged folder under a
    # name the ring knows, naming its writer, here one no longer running.
    buddies = node_slots(nodes.nodes[0], run) / slots.BUDDY / "node2"
    cut_off = buddies / f".{step_name(copied + 8)}.partial-node1-{2**22 - 3}"
    shutil.copytree(buddies / step_name(copied), cut_off)
    run_on_nodes(nodes, args, "replaced-again", tmp_path / "logs-again")
    log = (tmp_path / "logs-again" / "node1.log").read_text()
    assert not cut_off.exists() and f"removed 1 half-written copy a killed run left in {SHM}/{run.name}" in log
    for node in nodes.nodes:  # nothing stale in either node's /dev/shm: the ring holds committed slots only
        ring = node_slots(node, run)
        assert not [p for p in ring.rglob("*") if ".partial-" in p.name or p.name == ".lock"], node.name
        assert all(c for _, _, c in slots.list_slots(str(ring)))
    restored = re.search(r"node2 lacked its part of the ring's restart slot of step (\d+) \(ranks 2-3\): restored "
                         r"from the buddy copy on node1 \(([\d.]+) MiB", log)
    assert restored and int(restored.group(1)) >= copied, log[-3000:]
    assert f"resumed from the ring's restart slot of step {restored.group(1)} in" in log, log[-3000:]
    assert losses(run) == expected

    damaged = tmp_path / "damaged"
    args = restart_job(pydoc_data, damaged, "parallel.zero_stage=1")
    copied = kill_after_buddy_copy(nodes, args, damaged, tmp_path / "logs-damaged")
    moments = node_slots(nodes.nodes[0], damaged) / slots.BUDDY / "node2" / step_name(copied) / slots.moments_file(3, 0)
    moments.write_bytes(moments.read_bytes()[:-8] + b"\0" * 8)
    run_on_nodes(nodes, args, "damaged-again", tmp_path / "logs-damaged-again")
    log = (tmp_path / "logs-damaged-again" / "node1.log").read_text()
    assert f"node2's part of the ring's restart slot of step {copied} could not be restored from the buddy copy " \
           f"on node1: " in log and "does not match" in log, log[-3000:]
    assert f"the ring's restart slot of step {copied} is not on node2 (its /dev/shm was lost or replaced) and there " \
           f"is no usable buddy copy of its part; no checkpoint yet: the run starts over" in log, log[-3000:]
    assert "resumed from the ring" not in log
    assert losses(damaged) == expected
