"""Lost peers, found in seconds: a heartbeat through the rendezvous store, and one line when a
node is gone.

A collective waits for a dead peer until its timeout (30 minutes by default) unless the peer's
kernel resets the connection; a node that vanishes (power, network) resets nothing, and the job
would hold its whole allocation for that long. Each rank bumps a counter in the rendezvous store
every `interval` seconds from a thread, and watches the next rank's counter (a ring: one read
per rank per interval, whatever the world size). A rank whose watched peer stands still for
`timeout` seconds posts a verdict in the store; every rank reads the verdict at its next beat,
says it in one line and leaves with exit code 75 (a temporary failure: the same command resumes
from the last checkpoint). A rank that cannot reach the store itself for `timeout` seconds leaves
the same way. Bound: a silent death stops the job within timeout + 2 intervals.

A collective that fails at once (the peer's kernel reset the connection: the process died but its
node lives) is turned into the same kind of line by `lost_peer_message`.
"""
from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from core.distributed import Parallel
from core.log import logger
from core.orphans import leave_if_orphaned

PEER_LOST_EXIT = 75  # EX_TEMPFAIL
_RESUME = "the same command resumes from the last checkpoint"


class PeerWatchdog:
    def __init__(self, par: Parallel, timeout_s: float, master_addr: str, master_port: int):
        self.par, self.timeout_s = par, timeout_s
        self.interval_s = max(0.5, min(5.0, timeout_s / 4))
        self.where = f"{master_addr}:{master_port}"
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", os.environ.get("SLURM_RESTART_COUNT", "0"))
        prefix = f"lawa-watchdog/{attempt}"
        self.watched = (par.rank + 1) % par.world_size
        self.keys = {"beat": f"{prefix}/beat/{par.rank}", "verdict": f"{prefix}/verdict",
                     "peer": f"{prefix}/beat/{self.watched}", "peer_done": f"{prefix}/done/{self.watched}",
                     "done": f"{prefix}/done/{par.rank}"}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        now = time.monotonic()
        self._contact, self._seen, self._seen_at, self._peer_done, self._verdict = now, None, now, False, None
        self._threads: list[threading.Thread] = []
        self._store = None
        if par.world_size > 1 and timeout_s > 0:
            # Its own connection to the rendezvous store (torchrun's agent store, or rank 0's).
            self._store = dist.TCPStore(master_addr, master_port, is_master=False,
                                        timeout=timedelta(seconds=self.interval_s * 2), wait_for_workers=False)
            # Store calls block for as long as the kernel keeps retrying (many minutes) when the other
            # end has vanished: one thread does the store I/O, another judges the clock.
            for target, name in ((self._beat, "watchdog-beat"), (self._judge, "watchdog-judge")):
                self._threads.append(threading.Thread(target=target, daemon=True, name=name))
                self._threads[-1].start()

    def fail(self, message: str) -> None:
        """A collective of this rank failed at once: post the verdict unless another rank already
        did (its is the cause; this rank may only have lost a neighbour that left because of it),
        then leave with it."""
        if self._store is not None:
            with self._lock:
                posted = self._verdict
            message = posted or self._bounded(lambda: self._post(message), default=message)
        leave(message)

    def stop(self) -> None:
        """At the end of a run: this rank leaves on purpose, and its watcher must not mind."""
        if not self._threads:
            return
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._bounded(lambda: self._store.set(self.keys["done"], "1"))

    def _post(self, message: str) -> str:
        if self._store.check([self.keys["verdict"]]):
            return self._store.get(self.keys["verdict"]).decode()
        self._store.set(self.keys["verdict"], message)
        return message

    def _bounded(self, call, default=None):
        """`call()` in a helper thread, given one interval: a vanished store must not hold us."""
        out = [default]

        def run():
            try:
                out[0] = call()
            except Exception:  # the store is gone: the default stands
                pass
        helper = threading.Thread(target=run, daemon=True)
        helper.start()
        helper.join(self.interval_s)
        return out[0]

    def _beat(self) -> None:
        k = self.keys
        while not self._stop.wait(self.interval_s):
            try:
                self._store.add(k["beat"], 1)
                verdict = self._store.get(k["verdict"]).decode() if self._store.check([k["verdict"]]) else None
                peer_done = self._store.check([k["peer_done"]])
                seen = self._store.get(k["peer"]) if self._store.check([k["peer"]]) else None
            except Exception:  # unreachable: the judge counts how long
                continue
            now = time.monotonic()
            with self._lock:
                self._contact, self._verdict, self._peer_done = now, verdict, peer_done
                if seen != self._seen:
                    self._seen, self._seen_at = seen, now

    def _judge(self) -> None:
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            with self._lock:
                contact, seen_at, peer_done, verdict = self._contact, self._seen_at, self._peer_done, self._verdict
            if verdict:
                leave(verdict)
            if now - contact > self.timeout_s:
                leave(f"rank {self.par.rank} on {self.par.host} lost contact with the rendezvous store at {self.where} "
                      f"(no answer for {now - contact:.0f} s): the node of rank 0 died or the network is down; {_RESUME}")
            # A peer looks silent also when this rank cannot read the store: judge it only on fresh reads.
            if not peer_done and now - seen_at > self.timeout_s and now - contact <= 2 * self.interval_s:
                verdict = (f"{self.par.describe_ranks([self.watched])} stopped answering (no heartbeat for "
                           f"{now - seen_at:.0f} s): its node died or its network is down; {_RESUME}")
                leave(self._bounded(lambda v=verdict: self._post(v), default=verdict))


def leave(message: str) -> None:
    """Say why in one line and end this process at once: its collectives may never return."""
    leave_if_orphaned()  # the launcher killed: its store and peers went with it, which is not the cause
    logger.error(f"error: {message}")
    for handler in logger.handlers:
        handler.flush()
    os._exit(PEER_LOST_EXIT)


_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F:.]+)\]:\d+")
# What gloo and NCCL say when the other end of a collective is gone.
_NETWORK_WORDS = ("Connection reset", "Connection closed", "Connection refused", "Broken pipe", "Read error",
                  "Write error", "Timed out waiting", "timed out", "NCCL communicator was aborted",
                  "remote process exited", "Socket Timeout")


def lost_peer_message(error: BaseException, par: Parallel) -> Optional[str]:
    """One line for a collective that failed because a peer is gone, or None for other errors."""
    text = str(error)
    if not isinstance(error, RuntimeError) or not any(word in text for word in _NETWORK_WORDS):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    # gloo's "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:4242. This is typically ...":
    # its first sentence, without the source location.
    cause = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\] ", "", first).split(". ")[0][:160]
    peers = sorted({r for addr in _PEER_ADDRESS.findall(text) for r, a in enumerate(par.addresses) if a == addr})
    who = par.describe_ranks(peers) if peers else "a peer"
    return f"rank {par.rank} on {par.host} lost contact with {who} ({cause}); {_RESUME}"
