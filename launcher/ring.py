"""The snapshot ring, resolved once at start (`open_ring`, collective) into one object that the
snapshot writer, the restore path and the sidecar's spec take as it is:

- where it lives: `snapshot.dir` when the job names one; else node-local shared memory,
  /dev/shm/lawa-<uid>/<name>-<hash of run_dir> (the same path on every node, a different memory on
  each) when every node's has room; else `<run_dir>/snapshots`. When /dev/shm/lawa-<uid> is not
  this user's (another user made it first: it is a predictable name in a folder everyone may write),
  a private folder of the user's own takes its place, /dev/shm/lawa-<uid>-<random>, remembered in
  the run directory so that a restart finds its ring again; one warning says so;
- its folders, opened and checked up the whole path (core/private_folder.py): this user's alone,
  nothing inside that another user owns or that is a link; re-checked (device, inode, owner)
  before each commit and each sidecar read;
- whether every node sees the same storage (marks each node's first rank makes, O_EXCL, never
  through a link), and so who keeps it: each node's first rank for its node's part, or rank 0;
- restart points (`snapshot.restart_every`) and buddy copies (`snapshot.replicate`), decided here;
- its room: free space plus this run's slots, on the tightest node; what a killed writer left half
  written is removed, and never counted;
- its lock: one run per ring (core/run_lock.py), held by each keeper for the run's life.

The memory plan (launcher/plan.py) takes the room as an input and does no I/O of its own.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from dataclasses import dataclass
from typing import Optional

from averaging.slots import remove_stale_copies
from core.config import ConfigError
from core.distributed import Parallel, barrier, gather_objects
from core.files import PARTIAL, write_file_atomic
from core.log import logger
from core.private_folder import NotPrivate, PrivateFolder
from core.run_dir import SHM, RunDir, user_shm_root
from core.run_lock import Locked, RunLock

RING_FILE_MODE = 0o600  # the ring's files: this user's only (its folders are 0700)


def default_ring(run_dir: str, name: str, base: Optional[str] = None) -> str:
    """The ring's folder in node-local shared memory: <base>/<name>-<hash of run_dir>, base
    /dev/shm/lawa-<uid> unless another was chosen."""
    tag = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:8]
    return os.path.join(base or user_shm_root(), f"{name}-{tag}")


def is_node_local(path: str) -> bool:
    return os.path.abspath(path).startswith(SHM + "/")


def ring_room(root: str) -> int:
    """Bytes a ring at `root` can take: its file system's free space plus what `root` already holds
    (this run's slots from before a restart, which the ring recycles); half-written copies a killed
    writer left are not counted (the ring removes them)."""
    probe = os.path.abspath(root)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    held = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not PARTIAL.match(d)]
        for name in files:
            if PARTIAL.match(name):
                continue
            try:
                held += os.path.getsize(os.path.join(folder, name))
            except OSError:  # gone meanwhile
                pass
    return shutil.disk_usage(probe).free + held


@dataclass
class Ring:
    root: str
    folder: PrivateFolder  # this rank's open handle on it
    shared: bool  # one storage every node sees (else each node holds its own ranks' files)
    keeper: bool  # this rank commits, recycles and cleans its node's part (rank 0 the whole, when shared)
    restart_every: int  # every n-th snapshot also a restart point; 0: weights only
    buddies: bool  # each node's part of every restart slot also goes to the next node
    room: int  # bytes it may take on the tightest node
    lock: Optional[RunLock] = None  # held by the keeper

    @property
    def restarts(self) -> bool:
        return self.restart_every > 0

    @property
    def node_local(self) -> bool:
        return is_node_local(self.root)

    def check(self) -> None:
        """FolderReplaced unless the ring is still the folder opened at start."""
        self.folder.check()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
        self.folder.close()


def _collect(problem: Optional[str], par: Parallel, key: str) -> None:
    """Collective: every rank raises the first problem any rank met, as one line naming `key`."""
    seen = [p for p in gather_objects(problem, par.ctrl_group) if p is not None]
    if seen:
        raise ConfigError(f"{key}: {seen[0]}")


def _squat_free_base(par: Parallel, run_dir: str) -> tuple[Optional[str], Optional[str]]:
    """Collective: the base folder of a default ring, and the warning to say. /dev/shm/lawa-<uid> on
    every node when it is this user's; when on some node it is not (made first by another user), a
    folder of the user's own instead, its name random once and kept in the run directory."""
    squatted = None
    if par.is_node_first and os.path.isdir(SHM):
        try:
            PrivateFolder(user_shm_root()).close()
        except NotPrivate as e:
            squatted = str(e)
    seen = [s for s in gather_objects(squatted, par.ctrl_group) if s is not None]
    if not seen:
        return None, None
    keep = RunDir(run_dir).ring_base
    base = None
    if par.is_main:
        if os.path.isfile(keep):
            with open(keep) as f:
                base = f.read().strip()
        if not base or os.path.dirname(base) != SHM:
            base = f"{user_shm_root()}-{secrets.token_hex(8)}"
            write_file_atomic(keep, base + "\n")
    base = gather_objects(base, par.ctrl_group)[0]
    return base, (f"{seen[0].split(':')[0]}; the ring goes to {base} instead (a private folder of this user's, its "
                  f"name kept for this run's restarts in {keep})")


def _place(args, par: Parallel, run_dir: str, name: str, bytes_per_node: int) -> tuple[str, Optional[str]]:
    """Collective: where the ring goes, and a note to say about it."""
    if args.dir:
        return args.dir, None
    base, warning = _squat_free_base(par, run_dir)
    shm_root = default_ring(run_dir, name, base)
    room = None
    if par.is_node_first:
        room = os.path.isdir(SHM) and os.access(SHM, os.W_OK) and ring_room(shm_root) >= bytes_per_node
    rooms = gather_objects(room, par.ctrl_group)
    if all(r for r in rooms if r is not None):
        return shm_root, warning
    short = [par.hosts[r] for r, room in enumerate(rooms) if room is False]
    return RunDir(run_dir).snapshots, (f"/dev/shm on {', '.join(short)} is missing or has less than the "
                                       f"{bytes_per_node / 2**30:.2f} GiB the ring needs with room to spare; snapshots "
                                       f"go to {RunDir(run_dir).snapshots} (snapshot.dir chooses)")


def _shared(folder: PrivateFolder, par: Parallel) -> bool:
    """Collective: whether every node sees the same folder (a shared file system) or each its own."""
    if len(set(par.hosts)) == 1:
        return False
    token = gather_objects(secrets.token_hex(4) if par.is_main else None, par.ctrl_group)[0]
    mark = f".node-{token}-{par.host}"
    if par.is_node_first:
        folder.create_mark(mark)
    barrier(par.ctrl_group)
    sees_all = all(os.path.exists(os.path.join(folder.path, f".node-{token}-{host}")) for host in set(par.hosts))
    shared = all(gather_objects(sees_all, par.ctrl_group))
    if par.is_node_first:
        folder.remove_mark(mark)
    return shared


def open_ring(args, par: Parallel, run_dir: str, name: str, bytes_per_node: int) -> Ring:
    """Collective, before any rank writes a slot: the job's ring, opened and checked (see the
    module's doc). A folder that is not this user's alone, or that holds what another user could
    have planted, is refused on every rank in one line naming it; so is a ring another live run holds."""
    root, note = _place(args, par, run_dir, name, bytes_per_node)
    key = "snapshot.dir" if args.dir else "snapshot ring"
    problem = None
    parts = [os.path.dirname(root), root] if not args.dir and is_node_local(root) else [root]  # the per-user base too
    if par.is_node_first:
        try:
            for path in parts:
                PrivateFolder(path).close()  # made 0700 where missing, refused where not private
        except (NotPrivate, OSError) as e:
            problem = str(e)
    _collect(problem, par, key)
    folder, problem = None, None
    try:
        folder = PrivateFolder(root, create=False)
        if par.is_node_first:
            for _ in folder.walk():  # links, or anything another user owns, inside
                pass
    except (NotPrivate, OSError) as e:
        problem = str(e)
    _collect(problem, par, key)
    shared = not is_node_local(root) and _shared(folder, par)
    keeper = par.is_main if shared else par.is_node_first
    lock, problem, took_over = None, None, None
    if keeper:
        lock = RunLock(root, what=run_dir)
        try:
            took_over = lock.acquire()
        except Locked as e:
            problem = f"the ring {e}"
        removed = remove_stale_copies(root) if problem is None else []
        if removed:
            logger.warning(f"removed {len(removed)} half-written cop{'y' if len(removed) == 1 else 'ies'} a killed "
                           f"run left in {root} ({os.path.basename(removed[0])}{', ...' if len(removed) > 1 else ''})")
        if took_over:
            logger.warning(took_over)
    _collect(problem, par, key)
    rooms = [r for r in gather_objects(ring_room(root) if keeper else None, par.ctrl_group) if r is not None]
    buddies = args.replicate == "buddy" and args.restarts
    if buddies and (shared or len(set(par.hosts)) < 2):
        if par.is_main:
            logger.info(f"note: snapshot.replicate=buddy copies nothing here: "
                        f"{'the ring is on storage every node shares' if shared else 'there is one node'}")
        buddies = False
    if note and par.is_main:
        logger.warning(f"note: {note}")
    return Ring(root=root, folder=folder, shared=shared, keeper=keeper,
                restart_every=args.restart_every if args.restarts else 0,
                buddies=buddies, room=min(rooms), lock=lock)
