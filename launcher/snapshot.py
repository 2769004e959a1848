"""Trainer side of online LAWA: copy each rank's fp32 master partition (ZeRO-1, 2 or 3) into a ring buffer of slots.

The training loop pays only for the copy of its partition into a host buffer (on GPU, an
asynchronous copy on a side stream that the next optimizer update waits for on the device); a
background thread zeroes the partition padding and writes the slot. Committing needs every rank's
files, so the ranks vote over a small gloo group: four integers in the training loop's own vote
(launcher/trainer.py: at snapshot steps and every train.vote_every steps, one all-reduce that also
carries the preemption flag and the sidecar's liveness), no disk and no GPU synchronisation.
Decisions (skip, wait, commit, abandon) come out of that vote, so every rank takes the same one.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist

from averaging import slots
from averaging.ema_swa import ShardAverages
from core.config import FilePath, need
from core.deepspeed_compat import flat_layout, master_flat_groups, model_states, optimizer_states
from core.distributed import Parallel, gather_objects, vote
from core.flat_layout import zero_padding
from core.log import logger
from core.run_dir import RunDir
from core.zero_checkpoint import shapes_to_json
from launcher.buddy import BuddyReplicator
from launcher.ring import RING_FILE_MODE, Ring
from models.tensor_parallel import tensor_parallel_layout


@dataclass
class SnapshotArgs:
    every: int = 0  # snapshot the weights every this many steps (and at the end); 0: off
    slots: int = 8  # ring-buffer size: committed snapshots kept
    dir: Optional[FilePath] = None  # None: node-local /dev/shm/lawa-<uid>/<run> when it has room, else <run_dir>/snapshots
    if_busy: Literal["skip", "wait"] = "skip"  # when the previous write still runs at the next snapshot
    max_write_mb_per_s: float = 0.0  # throttle the background write (shared disks); 0: unlimited
    cleanup: bool = True  # delete slots under /dev/shm when training ends normally (they hold RAM)
    # Every this many snapshots is also a restart point: it carries the optimizer's moments, and a run
    # restarted on the same nodes resumes from the newest one when it is newer than its newest
    # checkpoint (launcher/ring_restart.py); 0: weights only.
    restart_every: int = 0
    # buddy: each node's part of every restart slot is copied, in the background, to the next node's
    # ring too, so a node replaced with an empty /dev/shm restarts from the ring (launcher/buddy.py).
    replicate: Literal["none", "buddy"] = "none"

    @property
    def restarts(self) -> bool:
        """Whether some snapshots are restart points: the one place this is decided."""
        return self.every > 0 and self.restart_every > 0

    def validate(self) -> None:
        need(self.every >= 0, f"snapshot.every: must be >= 0, got {self.every}")
        need(self.restart_every >= 0, f"snapshot.restart_every: must be >= 0, got {self.restart_every}")
        need(self.replicate == "none" or self.restart_every > 0,
             "snapshot.replicate: buddy copies the restart slots, and snapshot.restart_every is 0 (none are "
             "written); set it, e.g. snapshot.restart_every=4")
        need(self.slots >= 2, f"snapshot.slots: must be >= 2 (one is being written while others are read), "
                              f"got {self.slots}")
        need(self.max_write_mb_per_s >= 0, f"snapshot.max_write_mb_per_s: must be >= 0, got {self.max_write_mb_per_s}")


def model_states_metadata(engine, par: Parallel) -> dict[str, Any]:
    """The engine's model-states metadata for its slot files. Built once (collective: DeepSpeed's
    module_state_dict gathers at ZeRO-3)."""
    states = model_states(engine)
    return slots.model_states_metadata(states["param_shapes"], par.dp, par.tp, tensor_parallel_layout(engine.module),
                                       module=states["module"], buffer_names=states["buffer_names"],
                                       shared_params=states["shared_params"])


class SnapshotWriter:
    """Writes the raw partition, and the EMA/SWA partitions of `averages` when they have started,
    into each slot (the averages in sub-folders `ema/`, `swa/` of the same layout)."""

    def __init__(self, args: SnapshotArgs, engine, par: Parallel, ring: Ring, resume_step: int,
                 averages: Optional[ShardAverages] = None, run_dir: Optional[str] = None):
        self.args = args
        self.run_id = RunDir(run_dir).read_run_id() if run_dir else None
        self.engine = engine
        self.averages = averages
        self.par = par
        self.ring = ring
        self.root = ring.root
        self.flat = master_flat_groups(engine)
        self.layout = flat_layout(engine, par.dp)
        self.model_states = model_states_metadata(engine, par)
        self.param_shapes = self.model_states["param_shapes"]
        self.on_gpu = par.device.type == "cuda"
        self.host: dict[str, list[torch.Tensor]] = {"raw": self._host_buffers()}
        self.copy_stream = torch.cuda.Stream(par.device) if self.on_gpu else None
        self.copy_event: Optional[torch.cuda.Event] = None
        self.thread: Optional[threading.Thread] = None
        self.commit_thread: Optional[threading.Thread] = None
        self.pending: Optional[dict[str, Any]] = None  # the snapshot written but not yet committed
        self.done_step = -1
        self.any_busy = False  # as of the last vote: some rank was still writing
        self.committed: list[int] = []  # the steps this run committed (less any abandoned after)
        self.failed: Optional[BaseException] = None
        self.commit_failure: Optional[tuple[int, str]] = None  # (step, why) of a commit this node could not do
        self.written: dict[str, dict] = {}
        # Who commits, recycles and cleans the ring (launcher/ring.py): one rank per node when each node
        # has its own storage (each commits its node's part of every slot), one rank in all when shared.
        self.shared, self.keeper = ring.shared, ring.keeper
        self.buddies = BuddyReplicator(par, ring.root, resume_step) if ring.buddies else None
        if self.keeper:
            # Torn slots of a crash, and slots from past the checkpoint we resume from (the resumed
            # run writes those steps again), are not part of this run's history.
            for step, path, committed in slots.list_slots(ring.root):
                if not committed or step > resume_step:
                    slots.remove_slot(path)
        dist.barrier(group=par.ctrl_group)

    def _host_buffers(self) -> list[torch.Tensor]:
        return [torch.empty(f.numel(), dtype=torch.float32, pin_memory=self.on_gpu) for f in self.flat]

    def slot_dir(self, step: int) -> str:
        return slots.slot_path(self.root, step)

    # -- called by the training loop -------------------------------------------------------------

    def fence(self) -> None:
        """Before the optimizer update: the device waits for an in-flight copy of the partition."""
        if self.copy_event is not None:
            torch.cuda.current_stream(self.par.device).wait_event(self.copy_event)
            self.copy_event = None

    def due(self, step: int, final: bool = False) -> bool:
        return step % self.args.every == 0 or final

    def is_restart_point(self, step: int) -> bool:
        every = self.args.every * self.ring.restart_every
        return every > 0 and step % every == 0

    def ballot(self) -> list[int]:
        """This rank's part of a vote: the newest step it finished writing, and (negated) whether it
        is still writing, whether its write failed, whether its node could not commit."""
        busy = self.thread is not None and self.thread.is_alive()
        return [self.done_step, -int(busy), -int(self.failed is not None), -int(self.commit_failure is not None)]

    def vote(self) -> None:
        """Collective: a vote of this writer's own (the loop votes for it, with its other flags)."""
        self.settle(vote(self.ballot(), self.par.ctrl_group))

    def after_step(self, step: int, tokens: int, lr: float, final: bool = False) -> dict[str, Any]:
        """When a snapshot is due (collective then; the vote of this step has been settled): skip it,
        wait for the previous write, or take it; returns what it did that metrics.jsonl records
        (snapshot_skipped, snapshot_wait_s, snapshot_stall_s)."""
        if not self.due(step, final):
            return {}
        stats: dict[str, Any] = {}
        if self.any_busy:
            if self.args.if_busy == "skip" and not final:
                logger.info(f"snapshot at step {step} skipped: the write of step {self.pending['step']} is still "
                         f"running (snapshot.if_busy=skip; use a longer snapshot.every or if_busy=wait)")
                return {"snapshot_skipped": step}
            start = time.perf_counter()
            self._join()
            self.vote()
            stats["snapshot_wait_s"] = time.perf_counter() - start
            logger.info(f"snapshot at step {step} waited {stats['snapshot_wait_s']:.2f}s for the previous write")
        stats["snapshot_stall_s"] = self._start(step, tokens, lr)
        if final:
            self.finish()
        return stats

    def finish(self) -> None:
        """Collective: wait for the last write and commit it; on return every node's commit is on
        disk (or abandoned on every node), so a marker written after it vouches for what it names."""
        self._join()
        self.vote()  # starts the last commit (off this thread) ...
        self._join_commit()
        self.vote()  # ... and a second vote hears of any node whose commit failed
        if self.buddies is not None:
            self.buddies.join()  # the last copies land before the run stops (bounded: its checkpoint needs none)

    def join_write(self) -> None:
        """Wait for this rank's background write in flight, if any (the next vote commits it);
        a write that failed raises here."""
        if self.thread is not None:
            self.thread.join()
        if self.failed is not None:
            raise RuntimeError(f"snapshot write failed: {self.failed!r}")

    @property
    def restart_pending(self) -> bool:
        """A restart slot is written but not yet committed: the loop votes at each step until it is
        (a bounded run of small votes per restart point), so that a failure loses about one snapshot
        interval, not two."""
        return self.pending is not None and bool(self.pending["restart"])

    @property
    def last_committed(self) -> Optional[int]:
        return self.committed[-1] if self.committed else None

    @property
    def partition_elements(self) -> int:
        """fp32 elements of this rank's partition: a slot holds 4 bytes of each per kind."""
        return sum(f.numel() for f in self.flat)

    # -- internals --------------------------------------------------------------------------------

    def _join(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        self._join_commit()

    def _join_commit(self) -> None:
        if self.commit_thread is not None:
            self.commit_thread.join()
            self.commit_thread = None

    def settle(self, result: list[int]) -> None:
        """After a vote (`result`: the minimum of every rank's ballot): commit or abandon the pending
        snapshot, and abandon on every node a snapshot that some node could not commit. Collective
        only when there is something to commit or abandon."""
        all_done, any_busy, any_failed, commit_failed = result[0], result[1] < 0, result[2] < 0, result[3] < 0
        self.any_busy = any_busy
        if commit_failed:
            self._abandon_uncommitted()
        if self.pending is not None and any_failed and not any_busy:
            step = self.pending["step"]
            why = gather_objects(None if self.failed is None else str(self.failed), self.par.ctrl_group)
            failed = [r for r, w in enumerate(why) if w is not None]
            self._abandon(step, f"{self.par.describe_ranks(failed)} could not write it ({why[failed[0]]})")
            self.pending, self.failed = None, None
        elif self.pending is not None and all_done >= self.pending["step"]:
            self._commit()

    def _abandon(self, step: int, why: str) -> None:
        if self.par.is_main:
            logger.warning(f"snapshot of step {step} abandoned on every node: {why}; training goes on, the next "
                           f"snapshot tries again")
        if self.keeper:
            slots.remove_slot(self.slot_dir(step))

    def _abandon_uncommitted(self) -> None:
        """Collective: some node could not commit its part of a slot (its storage is full): the
        other nodes' parts are useless, and go too."""
        failures = gather_objects(self.commit_failure, self.par.ctrl_group)
        self.commit_failure = None
        for step in sorted({f[0] for f in failures if f is not None}):
            hosts = [self.par.hosts[r] for r, f in enumerate(failures) if f is not None and f[0] == step]
            reason = next(f[1] for f in failures if f is not None and f[0] == step)
            self._abandon(step, f"{', '.join(dict.fromkeys(hosts))} could not commit its part ({reason})")
            if step in self.committed:
                self.committed.remove(step)

    def _commit(self) -> None:
        by_rank = gather_objects(self.written, self.par.ctrl_group)
        mine = range(self.par.world_size) if self.shared else self.par.node_ranks
        files = {name: meta for rank in mine for name, meta in by_rank[rank].items()}
        p = self.pending
        manifest = slots.SlotManifest(
            kind="raw", step=p["step"], tokens=p["tokens"], lr=p["lr"], dp=self.par.dp, tp=self.par.tp,
            param_shapes=shapes_to_json(self.param_shapes), files=files,
            tensor_parallel_layout=self.model_states["tensor_parallel_layout"], **self.layout.to_json(),
            ds_version=self.model_states["ds_version"], averages=p["averages"],
            node=None if self.shared else self.par.host, restart=p["restart"], run=self.run_id,
            nodes={host: self.par.ranks_on(host) for host in dict.fromkeys(self.par.hosts)})
        if self.keeper:
            # The fsyncs run off the training thread; the next write waits for them (see _write).
            self.commit_thread = threading.Thread(target=self._commit_part, args=(self.slot_dir(p["step"]), manifest),
                                                  daemon=True, name=f"commit-{p['step']}")
            self.commit_thread.start()
        self.committed.append(p["step"])
        self.pending = None

    def _commit_part(self, slot_dir: str, manifest: slots.SlotManifest) -> None:
        """This node's part of the commit (or the whole), off the training thread. A failure (storage
        full) is no commit: readers need every node's part, and the next vote abandons the rest."""
        try:
            self.ring.check()  # still the folder opened at start: never commit into one put in its place
            slots.commit(slot_dir, manifest, mode=RING_FILE_MODE)
        except OSError as e:  # reported by the next vote, which abandons the slot on every node
            self.commit_failure = (manifest.step, str(e))
        if manifest.restart and self.buddies is not None:  # (a part not committed is sent as nothing)
            self.buddies.submit(manifest.step)

    def _start(self, step: int, tokens: int, lr: float) -> float:
        start = time.perf_counter()
        sources = {"raw": self.flat, **(self.averages.current() if self.averages is not None else {})}
        restart: dict[str, Any] = {}
        if self.is_restart_point(step):
            states = optimizer_states(self.engine)
            sources.update({key: [state[key] for state in states] for key in slots.MOMENTS})
            restart = {"optimizer_steps": [float(state["step"]) for state in states]}
        for kind in sources:
            if kind not in self.host:
                self.host[kind] = self._host_buffers()
        if self.copy_stream is not None:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.par.device))
            with torch.cuda.stream(self.copy_stream):
                for kind, flats in sources.items():
                    for host, flat in zip(self.host[kind], flats):
                        host.copy_(flat.detach().view(-1), non_blocking=True)
            self.copy_event = torch.cuda.Event()
            self.copy_event.record(self.copy_stream)
        else:
            for kind, flats in sources.items():
                for host, flat in zip(self.host[kind], flats):
                    host.copy_(flat.detach().view(-1))
        stall = time.perf_counter() - start
        averages = self.averages.describe() if self.averages is not None else {}
        self.pending = {"step": step, "tokens": tokens, "lr": lr, "averages": averages, "restart": restart}
        self.thread = threading.Thread(target=self._write, args=(step, self.copy_event, list(sources)), daemon=True,
                                       name=f"snapshot-{step}")
        self.thread.start()
        return stall

    def _write(self, step: int, copied: Optional[torch.cuda.Event], kinds: list[str]) -> None:
        try:
            self.ring.check()  # still the folder opened at start: never write into one put in its place
            self._join_commit()  # recycling must not mistake a slot being committed for a torn one
            if copied is not None:
                copied.synchronize()
            if self.keeper:
                self._recycle(step)
            written = {}
            moments = {kind: self.host[kind] for kind in kinds if kind in slots.MOMENTS}
            if moments:
                written.update(slots.write_moments(self.slot_dir(step), self.par.dp_rank, self.par.tp_rank, moments,
                                                   self.args.max_write_mb_per_s * 1e6, RING_FILE_MODE))
            for kind in (k for k in kinds if k not in slots.MOMENTS):
                zero_padding(self.host[kind], self.layout, self.par.dp_rank)
                files = slots.write_shard(
                    slots.kind_dir(self.slot_dir(step), kind), self.par.dp_rank, self.par.tp_rank,
                    self.layout.stored(self.host[kind], self.par.dp_rank), {**self.model_states, "global_steps": step},
                    max_bytes_per_s=self.args.max_write_mb_per_s * 1e6, mode=RING_FILE_MODE, layout=self.layout)
                written.update({slots.kind_file(kind, name): meta for name, meta in files.items()})
            self.written = written
            self.done_step = step
        except BaseException as e:  # reported through the vote; training goes on
            self.failed = e

    def _recycle(self, step: int) -> None:
        """Make room in the ring: keep the newest slots-1 committed slots besides the one being
        written, and the newest committed restart slot wherever it falls."""
        existing = [(s, path, committed) for s, path, committed in slots.list_slots(self.root) if s != step]
        for _s, path, committed in existing:
            if not committed:
                slots.remove_slot(path)
        committed = [path for s, path, c in existing if c]
        restarts = [path for path in committed if os.path.isdir(os.path.join(path, slots.RESTART))]
        for path in committed[: max(0, len(committed) - (self.args.slots - 1))]:
            if not restarts or path != restarts[-1]:
                slots.remove_slot(path)

    def cleanup(self) -> None:
        """After a normal end: free node-local memory (committed slots elsewhere stay)."""
        if self.args.cleanup and self.ring.node_local and self.keeper:
            try:
                self.ring.check()
            except PermissionError as e:
                logger.warning(f"node-local snapshots not removed: {e}")
                return
            shutil.rmtree(self.root, ignore_errors=True)
            logger.info(f"removed node-local snapshots {self.root}")
