"""Buddy copies (snapshot.replicate: buddy): each node's part of every restart slot also lives on
the next node, so a node replaced with an empty /dev/shm restarts from the ring all the same.

While training runs, each node's keeper (its first rank) sends its node's part of each committed
restart slot to the next node's keeper and receives the previous node's, on a gloo group of the
keepers and a thread of their own (core/file_transfer.py), and keeps it, verified against the
part's own manifest, under `<ring>/buddy/<node>/step_N/` (averaging/slots.py). Every keeper hands
its thread the same restart slots in the same order (they follow the commit vote), so the
transfers pair up without a word of their own; a node whose part is missing sends nothing for it.

At restart (launcher/ring_restart.py), a node whose ranks lack the newest restart slot gets its
part back from the node holding a copy, over the control group, before any rank reads one.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Optional

import torch.distributed as dist

from averaging import slots
from core.distributed import Parallel, gather_objects
from core.file_transfer import FolderOffer, TransferError, exchange, offer_folder
from core.files import staged
from core.integrity import ChecksumMismatch, verify_file
from core.log import logger, rank_span


class NothingSent(Exception):
    """The peer had no part to send for this step."""


def offer_part(slot_dir: str, meta: dict) -> tuple[FolderOffer, list[int]]:
    """An offer of a committed part folder (a node's part of a slot, or a buddy copy of one) and
    its open files; an empty offer when it cannot be read (recycled, never committed)."""
    try:
        manifest = slots.read_manifest(slot_dir)
        return offer_folder(slot_dir, slots.part_files(manifest), meta)
    except (slots.SlotError, OSError):
        return FolderOffer(meta=meta), []


def receive_part(group: dist.ProcessGroup, out: str, take_from: int, send_to: Optional[int] = None,
                 offer: Optional[FolderOffer] = None, fds: Optional[list[int]] = None) -> FolderOffer:
    """Collective between two ranks of `group` (and whoever `send_to` names): the part folder
    `take_from` sends, checked against its own manifest's records and then renamed to `out`.
    NothingSent when it had none; TransferError when what came is not whole."""
    with staged(out) as tmp:
        os.makedirs(tmp, mode=0o700)
        got = exchange(group, send_to, offer, fds, take_from, tmp)
        if not got.files:
            raise NothingSent()
        try:
            manifest = slots.read_manifest(tmp)
        except slots.SlotError as e:
            raise TransferError(str(e)) from None
        missing = set(slots.part_files(manifest)) - {name for name, _ in got.files}
        if missing:
            raise TransferError(f"the copy lacks {sorted(missing)[0]}")
        for name, record in manifest.files.items():
            try:
                verify_file(os.path.join(tmp, name), record)
            except ChecksumMismatch:
                raise TransferError(f"{name} does not match the checksum its part's manifest records (damaged in "
                                    f"the copy or on the way)") from None
    return got


class BuddyReplicator:
    """Sends this node's part of each restart slot to the next node, keeps the previous node's."""

    def __init__(self, par: Parallel, root: str, resume_step: int):
        hosts = list(dict.fromkeys(par.hosts))
        keepers = [par.ranks_on(host)[0] for host in hosts]
        self.group = dist.new_group(keepers, backend="gloo")  # collective: every rank makes it
        self.par, self.root = par, root
        self.thread: Optional[threading.Thread] = None
        self.broken: Optional[str] = None
        if not par.is_node_first:
            return
        at = hosts.index(par.host)
        self.next_rank, self.prev_rank = keepers[(at + 1) % len(hosts)], keepers[at - 1]
        self.next_host, self.prev_host = hosts[(at + 1) % len(hosts)], hosts[at - 1]
        for _node, step, path in slots.buddy_copies(root):  # copies of steps the resumed run writes again
            if step > resume_step:
                slots.remove_slot(path)
        self.steps: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="buddy-copies")
        self.thread.start()

    def submit(self, step: int) -> None:
        """This node committed its part of restart slot `step` (or failed to: it then sends nothing)."""
        if self.thread is not None:
            self.steps.put(step)

    def join(self, timeout: float = 120.0) -> None:
        """Wait until every submitted part is sent and the previous node's is kept, up to `timeout`
        seconds: the run stops with a checkpoint of its own step, which needs no copy."""
        if self.thread is None:
            return
        with self.steps.all_tasks_done:
            done = self.steps.all_tasks_done.wait_for(lambda: not self.steps.unfinished_tasks, timeout)
        if not done:
            logger.warning(f"buddy copies: the copy of a restart slot to {self.next_host} still runs after "
                           f"{timeout:.0f} s; the run stops without waiting for it")

    def _run(self) -> None:
        while True:
            step = self.steps.get()
            try:
                if self.broken is None:
                    self._copy(step)
            finally:
                self.steps.task_done()

    def _copy(self, step: int) -> None:
        start = time.monotonic()
        offer, fds = offer_part(slots.slot_path(self.root, step), {"step": step, "node": self.par.host})
        try:
            got = receive_part(self.group, slots.buddy_path(self.root, self.prev_host, step), self.prev_rank,
                               self.next_rank, offer, fds)
        except NothingSent:
            return
        except TransferError as e:  # (every byte was still sent and received: the pair is in step)
            logger.warning(f"buddy copy of {self.prev_host}'s part of restart slot {step} not kept: {e}")
            return
        except Exception as e:  # the link itself failed: no more copies this run
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logger.warning(f"buddy copies stopped for this run at restart slot {step}: {self.broken}")
            return
        finally:
            for fd in fds:
                os.close(fd)
        for _node, older, path in slots.buddy_copies(self.root):
            if older < step:
                slots.remove_slot(path)
        logger.debug(f"buddy copy of {self.prev_host}'s part of restart slot {step}: "
                     f"{got.total_bytes / 2**20:.1f} MiB in {time.monotonic() - start:.2f} s")


def restore_from_buddies(root: str, par: Parallel, local_steps: list[int], after: int,
                         fits: Callable[[slots.SlotManifest], bool]) -> bool:
    """Collective, at restart: when the newest restart slot (newer than step `after`) that every
    rank has on its own node or in some node's buddy copy is not on every rank's own node, copy
    each missing node part back from a buddy copy into the ring of the node that now hosts those
    ranks (over the control group). `local_steps`: the restart steps this rank holds itself;
    `fits`: whether a copy's manifest is of this run and layout. Afterwards those ranks hold it too.
    Returns whether any node held a buddy copy newer than `after`."""
    held = buddy_holdings(root, after, fits) if par.is_node_first else []
    views = gather_objects((local_steps, held), par.ctrl_group)
    candidates = sorted({s for own, _ in views for s in own} | {s for _, h in views for s, _, _ in h}, reverse=True)
    copies = any(held for _, held in views)
    for step in candidates:
        lacking = [r for r, (own, _) in enumerate(views) if step not in own]
        if not lacking:
            return copies
        moves = plan_moves(par, views, step, lacking)
        if moves is not None:
            break
    else:
        return copies
    done = []  # what this rank restored, or could not: said by the main rank
    for holder, node, source in moves:
        receiver = par.ranks_on(node)[0]
        copy, out = slots.buddy_path(root, source, step), slots.slot_path(root, step)
        start = time.monotonic()
        note: Optional[tuple[Optional[str], str]] = None  # (problem, amount) on the receiving rank
        if par.rank == holder == receiver:  # the copy is on the node that needs it: link its files
            try:
                with staged(out) as tmp:
                    for name in slots.part_files(slots.read_manifest(copy)):
                        os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                        os.link(os.path.join(copy, name), os.path.join(tmp, name))
                note = (None, "linked")
            except (OSError, slots.SlotError) as e:
                note = (str(e), "")
        elif par.rank == holder:
            offer, fds = offer_part(copy, {"step": step, "node": source})
            try:
                exchange(par.ctrl_group, receiver, offer, fds)
            except TransferError:
                pass  # (what could not be read went as zeros: the receiver's check refuses it, and says so)
            finally:
                for fd in fds:
                    os.close(fd)
        elif par.rank == receiver:
            try:
                note = (None, f"{receive_part(par.ctrl_group, out, holder).total_bytes / 2**20:.1f} MiB")
            except (NothingSent, TransferError) as e:
                note = (str(e) or "nothing arrived", "")
        if note is not None:
            done.append((node, holder, note[0], f"{note[1]} in {time.monotonic() - start:.1f} s"))
    said = gather_objects(done, par.ctrl_group)
    if par.is_main:
        for node, holder, problem, amount in (n for notes in said for n in notes):
            if problem is None:
                logger.info(f"{node} lacked its part of the ring's restart slot of step {step} "
                            f"({rank_span(par.ranks_on(node))}): restored from the buddy copy on {par.hosts[holder]} "
                            f"({amount})")
            else:
                logger.warning(f"{node}'s part of the ring's restart slot of step {step} could not be restored "
                               f"from the buddy copy on {par.hosts[holder]}: {problem}")
    return copies


def buddy_holdings(root: str, after: int, fits: Callable[[slots.SlotManifest], bool]) -> list[tuple[int, list[int], str]]:
    """(step, ranks, source node) of the buddy copies of restart slots newer than `after` in this
    node's ring that `fits` accepts."""
    held = []
    for node, step, path in slots.buddy_copies(root):
        if step <= after:
            continue
        try:
            manifest = slots.read_manifest(path)
        except slots.SlotError:
            continue
        if fits(manifest) and manifest.node:
            held.append((step, list(manifest.nodes.get(manifest.node, [])), node))
    return held


def plan_moves(par: Parallel, views: list, step: int, lacking: list[int]) -> Optional[list[tuple[int, str, str]]]:
    """(holder rank, node to restore, source node of the copy) for every node whose ranks lack
    `step`; None when some node's lacking ranks are in no single buddy copy."""
    moves = []
    for node in dict.fromkeys(par.hosts[r] for r in lacking):
        need = {r for r in lacking if par.hosts[r] == node}
        holder = next(((rank, source) for rank, (_, held) in enumerate(views) for s, ranks, source in held
                       if s == step and need <= set(ranks)), None)
        if holder is None:
            return None
        moves.append((holder[0], node, holder[1]))
    return moves
