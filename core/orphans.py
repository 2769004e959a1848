"""A rank ends when the launcher that started it is gone.

torchrun and the DeepSpeed launcher start their workers in sessions of their own, so when only the
launcher dies (`kill -9` of it, an OOM kill of it) nothing stops the workers: they would train on
with no one to stop, restart or report them, while the same command, run again, starts a second run
on the same run directory. So every rank started by a launcher watches its parent: a thread looks at
`os.getppid()` every WATCH_S seconds, and once the parent has changed (the process was handed to
init or a subreaper) the rank says so in one line and leaves at once. mpirun's and srun's daemons
(orted/prted, slurmstepd) are parents the same way. A process started by hand (no launcher's
variables) is not watched.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Mapping, Optional

WATCH_S = 0.25  # a getppid() four times a second: nothing, beside a training step
LAUNCHER_VARIABLES = {  # a variable each launcher sets in its workers' environment, and the launcher's name
    "TORCHELASTIC_RUN_ID": "torchrun",
    "OMPI_COMM_WORLD_RANK": "mpirun",
    "SLURM_STEP_ID": "srun",
    "LOCAL_RANK": "the launcher",  # the DeepSpeed launcher (and any torchrun-like one)
}
ORPHANED_EXIT = 1
_watched: Optional[tuple[int, str, str, str]] = None  # (parent pid, launcher, what this process is, its rank)


def launcher_of(env: Mapping[str, str]) -> Optional[str]:
    """The name of the launcher that started this process, None when none did."""
    return next((name for key, name in LAUNCHER_VARIABLES.items() if key in env), None)


def leave_if_orphaned() -> None:
    """When the watched launcher is gone, say so in one line and leave at once. Also called by
    whatever else is about to stop the process for a failure (core/watchdog.py): a lost store or
    peer that followed from the launcher's death is not the cause to report."""
    if _watched is None or os.getppid() == _watched[0]:
        return
    parent, launcher, what, rank = _watched
    sys.stderr.write(f"[rank {rank}] {launcher} (pid {parent}) is gone: {what} (pid {os.getpid()}) stops now, "
                     f"rather than train on with no one to stop or restart it\n")
    sys.stderr.flush()
    os._exit(ORPHANED_EXIT)


def exit_with_launcher(env: Mapping[str, str] = os.environ, what: str = "this rank") -> Optional[threading.Thread]:
    """Starts the watch (see the module's doc) when a launcher started this process; returns its thread."""
    global _watched
    launcher = launcher_of(env)
    parent = os.getppid()
    if launcher is None or parent == 1:
        return None
    _watched = (parent, launcher, what, env.get("RANK", env.get("OMPI_COMM_WORLD_RANK", env.get("SLURM_PROCID", "?"))))

    def watch() -> None:
        while True:
            time.sleep(WATCH_S)
            leave_if_orphaned()

    thread = threading.Thread(target=watch, daemon=True, name="launcher-watch")
    thread.start()
    return thread
