"""Full, resumable checkpoints through DeepSpeed's `save_checkpoint`, durable before they count,
verified before they are used, the last n kept.

A checkpoint counts once its folder holds `run_state.json` (a `RunState`), which is written last:
after DeepSpeed's save, each rank fsyncs the files it wrote and records their size and xxh3; the
main rank makes the folder's names durable, then writes the marker with every file's record, then
points `latest` at it. A crash (of the process or of the machine) before the marker leaves a folder
that resume ignores; a file torn or changed after it is caught by `verify`, and resume falls back
to the newest checkpoint that verifies, saying so in one line.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from typing import Iterable, Optional

from averaging.ema_swa import ShardAverages
from core.config import ConfigError, FilePath, need
from core.distributed import Parallel, barrier, gather_objects
from core.files import PARTIAL, fsync_dir, serialize, step_name, step_of, write_file_atomic
from core.integrity import ChecksumMismatch, record_file, verify_file
from core.log import logger
from core.records import RecordError
from core.run_dir import LATEST, RUN_STATE, averages_file
from core.zero_checkpoint import RunState, load_recorded, writer_rank


@dataclass
class CheckpointArgs:
    every: int = 1000  # save a full checkpoint every this many steps, and at the end
    keep: int = 2  # complete checkpoints kept; older ones are deleted (resume falls back to an older one that verifies)
    dir: Optional[FilePath] = None  # None: <run_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint found in `dir` (the newest that verifies)
    on_signal: bool = True  # SIGUSR1/SIGTERM: finish the step, checkpoint, snapshot and stop
    requeue: bool = True  # after stopping on a signal under Slurm, `scontrol requeue` the job
    # Continual pretraining: start a new run from other weights (a checkpoints folder, a checkpoint or
    # slot folder, an average in lawa_best/, or a Hugging Face GPT-2/GPT-NeoX folder such as a Pythia
    # checkpoint), at step 0 of this job's schedule.
    init_from: Optional[FilePath] = None
    # Also take optimizer state (same layout needed): a checkpoint's own; for a slot or an average (a merge in
    # lawa_best/ or merges/<name>/), the moments of its run's newest complete checkpoint at or before its step.
    # false: fresh AdamW moments.
    init_optimizer: bool = False
    # A cooldown branch (launcher/cooldown.py): continue another run's complete checkpoint (weights, optimizer
    # state, step and tokens) in this run directory, under this job's schedule.
    branch_from: Optional[FilePath] = None
    # Unpickle the init_from / growth.from_run / branch_from source's torch files in full, which runs any code
    # they name: only for a checkpoint from a source you trust whose files hold more than tensors and
    # DeepSpeed's plain types (this project's own files never need it).
    trust_pickle: bool = False

    def validate(self) -> None:
        need(self.every > 0, f"checkpoint.every: must be positive, got {self.every}")
        need(self.keep >= 1, f"checkpoint.keep: must be >= 1, got {self.keep}")
        need(self.init_from is not None or not self.init_optimizer, "checkpoint.init_optimizer needs checkpoint.init_from")


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint (one with its marker), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        step = step_of(name)
        if step is not None and os.path.isfile(os.path.join(ckpt_dir, name, RUN_STATE)):
            found.append((step, name))
    return sorted(found)


def save(engine, ckpt_dir: str, state: RunState, keep: int, par: Parallel,
         averages: Optional[ShardAverages] = None, pinned: Iterable[int] = ()) -> str:
    """Collective: every rank calls it (with its EMA/SWA, if any). Returns the tag written. The
    newest `keep` complete checkpoints are kept, and those of the `pinned` steps (a scheduled
    cooldown branches from them)."""
    tag = step_name(state.step)
    folder = os.path.join(ckpt_dir, tag)
    if par.is_main and os.path.isfile(os.path.join(folder, RUN_STATE)):
        os.remove(os.path.join(folder, RUN_STATE))  # a tag written again is incomplete until it is whole again
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"run_state": dataclasses.asdict(state)}, save_latest=False)
    if averages is not None and averages.enabled:
        write_file_atomic(os.path.join(folder, averages_file(par.dp_rank, par.tp_rank)),
                          serialize(averages.state_dict()))
    barrier()
    # Each rank makes durable, and records, the files it wrote (still in its page cache).
    mine = {name: record_file(os.path.join(folder, name), fsync=True) for name in _files(folder)
            if writer_rank(name, par.tp) % par.world_size == par.rank}
    records = {name: record for part in gather_objects(mine, par.ctrl_group) for name, record in part.items()}
    if par.is_main:
        fsync_dir(folder)  # the files' names are durable before the marker that vouches for them
        dataclasses.replace(state, files=records).write(folder)
        fsync_dir(folder)
        write_file_atomic(os.path.join(ckpt_dir, LATEST), tag)  # what zero_to_fp32 reads by default
        fsync_dir(ckpt_dir)
        pinned = set(pinned)
        for step, old in complete_checkpoints(ckpt_dir)[:-keep]:
            if step not in pinned:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def _files(folder: str) -> list[str]:
    return sorted(name for name in os.listdir(folder)
                  if name != RUN_STATE and not PARTIAL.match(name) and os.path.isfile(os.path.join(folder, name)))


def _own_problem(checkpoint: str, par: Parallel) -> Optional[str]:
    """What is wrong with this rank's share of a checkpoint's files (those its counterpart wrote),
    in one line; None when each matches its record."""
    try:
        state = RunState.read(checkpoint)
        names = sorted(state.files)
        if par.is_main and state.files:
            unlisted = sorted(set(_files(checkpoint)) - set(state.files))
            if unlisted:
                return f"{os.path.join(checkpoint, unlisted[0])} is not among the files its checkpoint records"
        for name in names:
            if writer_rank(name, state.tp) % par.world_size == par.rank:
                verify_file(os.path.join(checkpoint, name), state.files[name])
    except ChecksumMismatch as e:
        return str(e)
    except FileNotFoundError as e:
        return f"{e.filename or checkpoint} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable (I/O error, torn run state): not verified
        return f"{checkpoint}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def verify(checkpoint: str, par: Parallel) -> Optional[str]:
    """Collective: None when every file of a complete checkpoint matches its record (or it records
    none: written before records) and it holds no file its records do not list; else the first
    problem, in one line, the same on every rank. Each rank checks the files its counterpart wrote,
    which it is about to load; any failure to read one is a failure to verify."""
    return next((p for p in gather_objects(_own_problem(checkpoint, par), par.ctrl_group) if p is not None), None)


@dataclass
class Verified:
    """This run's newest checkpoint that verifies (None: none does), and the newer ones that do not."""

    path: Optional[str]
    failed: list[tuple[str, str]]  # (tag, problem), newest first

    def refusal(self, ckpt_dir: str) -> str:
        tag, problem = self.failed[0]
        return (f"no checkpoint in {ckpt_dir} verifies (newest: {tag}: {problem}) and the ring holds no restart point "
                f"of this run to resume from; to start afresh, move {ckpt_dir} away or choose another run_dir")


def newest_verified(ckpt_dir: str, par: Parallel) -> Verified:
    """Collective: this run's newest complete checkpoint that verifies, and the newer ones that do not
    (every rank gets the same verdicts: `verify` gathers them)."""
    failed: list[tuple[str, str]] = []
    for _, tag in reversed(complete_checkpoints(ckpt_dir)):
        problem = verify(os.path.join(ckpt_dir, tag), par)
        if problem is None:
            return Verified(os.path.join(ckpt_dir, tag), failed)
        failed.append((tag, problem))
    return Verified(None, failed)


def set_aside(ckpt_dir: str, verified: Verified, instead: str, par: Parallel) -> None:
    """Collective: the checkpoints that did not verify renamed `<tag>.unverified` (or `-2`, `-3`... when
    taken), kept for a look and out of resume's way, with one line saying what was wrong and what
    the run resumes from instead. A rename that fails is said, and the run goes on."""
    if par.is_main and verified.failed:
        moved = []
        for bad, _ in verified.failed:
            target = os.path.join(ckpt_dir, f"{bad}.unverified")
            n = 1
            while os.path.lexists(target):
                n += 1
                target = os.path.join(ckpt_dir, f"{bad}.unverified-{n}")
            try:
                os.rename(os.path.join(ckpt_dir, bad), target)
                moved.append(os.path.basename(target))
            except OSError as e:
                moved.append(f"{bad} not moved: {e.strerror or e}")
        if verified.path is not None:
            try:
                write_file_atomic(os.path.join(ckpt_dir, LATEST), os.path.basename(verified.path))
            except OSError as e:
                logger.warning(f"could not point {os.path.join(ckpt_dir, LATEST)} at {verified.path}: {e}")
        logger.warning(f"checkpoint {verified.failed[0][0]} does not verify ({verified.failed[0][1]}); resuming from "
                       f"{instead} instead (set aside: {', '.join(moved)})")
    barrier()


def load(engine, checkpoint: str) -> None:
    """Collective. Loads weights, optimizer state and engine counters of a complete checkpoint."""
    path, _ = engine.load_checkpoint(os.path.dirname(checkpoint), tag=os.path.basename(checkpoint),
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint}")


def load_averages(checkpoint: str, par: Parallel, averages: ShardAverages) -> None:
    """This rank's EMA/SWA state from a checkpoint, verified against its record."""
    path = os.path.join(checkpoint, averages_file(par.dp_rank, par.tp_rank))
    if os.path.isfile(path):  # held to the checkpoint's records: a file they do not list is refused
        averages.load_state_dict(load_recorded(path, RunState.read(checkpoint).files or None))
    else:
        logger.info(f"note: {checkpoint} holds no EMA/SWA state; the averages start afresh")


def check_layout(checkpoint: str, par: Parallel, stage: int, key: str, remedy: str) -> RunState:
    """The checkpoint's run state, once its data × tensor layout and ZeRO stage are known to be this run's."""
    try:
        state = RunState.read(checkpoint)
    except RecordError as e:
        raise ConfigError(f"{key}: {e}") from None
    if (state.dp, state.tp, state.zero_stage) != (par.dp, par.tp, stage):
        raise ConfigError(f"{key}: {checkpoint} was written with data {state.dp} × tensor {state.tp} at ZeRO-"
                          f"{state.zero_stage}, this run is data {par.dp} × tensor {par.tp} at ZeRO-{stage}; {remedy}")
    return state


def continued_stage(ckpt_dir: str, resume: bool, branch_from: Optional[str]) -> Optional[int]:
    """The ZeRO stage of the checkpoint a run continues (its own newest, or the one it branches
    from): `parallel.zero_stage: auto` keeps it. None for a run that starts afresh."""
    found = complete_checkpoints(ckpt_dir) if resume else []
    for _, tag in reversed(found):  # one whose record cannot be read is set aside when resuming (verify)
        try:
            return RunState.read(os.path.join(ckpt_dir, tag)).zero_stage
        except (RecordError, OSError):
            continue
    if found or branch_from is None or not os.path.isfile(os.path.join(branch_from, RUN_STATE)):
        return None
    try:
        return RunState.read(branch_from).zero_stage
    except (RecordError, OSError) as e:
        raise ConfigError(f"checkpoint.branch_from: {str(e).splitlines()[0]}") from None
