"""Resume from the snapshot ring: a restart slot (snapshot.restart_every) holds every rank's fp32
master partition, its optimizer moments and step counts, and its EMA/SWA; the schedule, the data
order and dropout are functions of the step. So when a run restarts on the nodes that wrote it
(torchrun's worker restarts, a requeue onto the same nodes), the newest restart slot that every
rank holds and that verifies is as good as a checkpoint of its step, and newer than the last one.

Every rank reads and verifies its own files first; the engine is touched only once all agree. A
slot some rank cannot use (torn, corrupt, missing on a node) is passed over in one line, for an
older one or the checkpoint. A node that lost its part (replaced, rebooted) gets it back first from
the buddy copy on another node, when the run keeps them (snapshot.replicate: launcher/buddy.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from averaging import slots
from averaging.ema_swa import ShardAverages
from core.deepspeed_compat import (
    master_flat_groups,
    optimizer_states,
    refresh_working_copy,
    set_step_counters,
    step_count_on_device,
    zero_stage,
)
from core.distributed import Parallel, gather_objects
from core.log import logger
from core.run_dir import RunDir
from launcher.buddy import restore_from_buddies


@dataclass(frozen=True)
class RestartKey:
    """What a restart slot must be to restart this run: written by it (its run id), in its layout."""

    run_id: Optional[str]
    dp: int
    tp: int
    stage: int

    def fits(self, manifest: slots.SlotManifest) -> bool:
        return bool(manifest.restart) and self.run_id is not None and manifest.run == self.run_id and \
            (manifest.dp, manifest.tp, manifest.zero_stage) == (self.dp, self.tp, self.stage)


def restart_steps(root: str, par: Parallel, key: RestartKey, after: int) -> list[int]:
    """The committed restart slots of this run in this rank's view of the ring, newer than step
    `after`, whose manifest says they hold this rank's files."""
    found = []
    for step, path, committed in slots.list_slots(root):
        if not committed or step <= after:
            continue
        try:
            manifest = slots.read_manifest(path)
        except slots.SlotError:
            continue
        if key.fits(manifest) and slots.moments_file(par.dp_rank, par.tp_rank) in manifest.files:
            found.append(step)
    return found


def read_own_part(path: str, par: Parallel, averages: ShardAverages) -> dict[str, Any]:
    """This rank's verified part of a restart slot: weights, moments, EMA/SWA and the manifest."""
    manifest = slots.read_manifest(path)
    weights, _ = slots.read_shard(path, par.dp_rank, par.tp_rank, manifest)
    part = {"manifest": manifest, "weights": weights,
            "moments": slots.read_moments(path, par.dp_rank, par.tp_rank, manifest), "averages": {}}
    if averages.enabled:
        for kind in manifest.averages:
            part["averages"][kind], _ = slots.read_shard(path, par.dp_rank, par.tp_rank, manifest, kind=kind)
    return part


@torch.no_grad()
def apply(engine, par: Parallel, part: dict[str, Any], averages: ShardAverages) -> None:
    """Collective: the part into the engine (master, moments, working copy, counters) and averages."""
    manifest = part["manifest"]
    states = optimizer_states(engine)
    on_device = step_count_on_device(engine)
    for g, master in enumerate(master_flat_groups(engine)):
        stored = part["weights"][g].view(-1)
        master.data.view(-1).zero_()[: stored.numel()].copy_(stored)
        state = states[g]
        for key in slots.MOMENTS:
            saved = part["moments"][key][g].view(-1)
            if key not in state:
                state[key] = torch.zeros_like(master.data)
            state[key].view(-1).copy_(saved.to(state[key].device))
        step = manifest.restart["optimizer_steps"][g]
        if "step" in state:
            state["step"].fill_(step)
        else:  # as AdamW makes it on its first step: on the device when fused, else on the CPU
            state["step"] = torch.tensor(step, dtype=torch.float32, device=master.device if on_device else "cpu")
    refresh_working_copy(engine, par.dp_group)
    set_step_counters(engine, manifest.step, manifest.step * _samples_per_step(engine))
    if averages.enabled:
        described = manifest.averages
        averages.load_state_dict({
            "ema": part["averages"].get("ema"), "ema_updates": described.get("ema", {}).get("updates", 0),
            "swa": part["averages"].get("swa"), "swa_count": described.get("swa", {}).get("count", 0)})


def _samples_per_step(engine) -> int:
    return int(engine.train_batch_size())


def resume_from_ring(engine, par: Parallel, root: str, run_dir: str, after: int,
                     averages: ShardAverages) -> Optional[tuple[int, int, str]]:
    """Collective. (step, tokens, slot folder) of the restart slot the run resumed from, once loaded;
    None when no restart slot newer than step `after` (the newest checkpoint's; -1: none) is held
    and readable on every rank."""
    key = RestartKey(RunDir(run_dir).read_run_id(), par.dp, par.tp, zero_stage(engine))
    copies = restore_from_buddies(root, par, restart_steps(root, par, key, after), after, key.fits)
    views = gather_objects(restart_steps(root, par, key, after), par.ctrl_group)
    common = sorted(set.intersection(*(set(v) for v in views)))
    anywhere = sorted(set().union(*(set(v) for v in views)))
    if not common:
        if anywhere and par.is_main:
            lacking = sorted({par.hosts[r] for r, v in enumerate(views) if anywhere[-1] not in v})
            copy = "no usable buddy copy of its part" if copies else \
                "no buddy copy of its part (snapshot.replicate: buddy keeps one on the next node)"
            then = f"resuming from the newest checkpoint (step {after})" if after >= 0 else \
                "no checkpoint yet: the run starts over"
            logger.warning(f"the ring's restart slot of step {anywhere[-1]} is not on {', '.join(lacking)} (its "
                           f"/dev/shm was lost or replaced) and there is {copy}; {then}")
        return None
    for step in reversed(common):
        path = slots.slot_path(root, step)
        part, problem = None, None
        try:
            part = read_own_part(path, par, averages)
        except (slots.SlotError, ValueError, KeyError, IndexError) as e:
            problem = str(e).splitlines()[0] if str(e) else type(e).__name__
        problems = [p for p in gather_objects(problem, par.ctrl_group) if p is not None]
        if problems:
            if par.is_main:
                logger.warning(f"the ring's restart slot of step {step} cannot be used ({problems[0]}); trying an "
                               f"older one, else the newest checkpoint")
            continue
        apply(engine, par, part, averages)
        manifest = part["manifest"]
        saved = f"{step - after} steps after the newest checkpoint (step {after})" if after >= 0 else "no checkpoint yet"
        logger.info(f"resumed from the ring's restart slot of step {step} in {root}: {saved}")
        return manifest.step, manifest.tokens, path
    return None
