"""Full, resumable checkpoints through DeepSpeed's `save_checkpoint`, keeping the last n.

A checkpoint counts only once every rank has written it: after DeepSpeed's save and a barrier,
the main rank writes `run_state.json` into the tag folder and then points `latest` at it, each
with an atomic rename. A crash mid-save leaves a folder without `run_state.json`, which resume
ignores, and `latest` still names the previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import torch

from averaging import slots
from averaging.consolidate import consolidate
from averaging.slots import serialize, write_file_atomic
from models.tensor_parallel import split_tensor, tensor_parallel_layout
from launcher.distributed import barrier

RUN_STATE = "run_state.json"
TAG_PREFIX = "step_"


@dataclass
class CheckpointArgs:
    every: int = 1000  # save a full checkpoint every this many steps, and at the end
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint found in `dir`
    on_signal: bool = True  # SIGUSR1/SIGTERM: finish the step, checkpoint, snapshot and stop
    requeue: bool = True  # after stopping on a signal under Slurm, `scontrol requeue` the job
    # Continual pretraining: start a new run from other weights (a checkpoints folder, a checkpoint or
    # slot folder, an average in lawa_best/, or a Hugging Face GPT-2/GPT-NeoX folder such as a Pythia
    # checkpoint), at step 0 of this job's schedule.
    init_from: Optional[str] = None
    init_optimizer: bool = False  # also take its optimizer state (same layout needed); false: fresh AdamW


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        digits = name[len(TAG_PREFIX):]
        if name.startswith(TAG_PREFIX) and digits.isdigit() and os.path.isfile(os.path.join(ckpt_dir, name, RUN_STATE)):
            found.append((int(digits), name))
    return sorted(found)


def read_run_state(ckpt_dir: str, tag: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, RUN_STATE)) as f:
        return json.load(f)


def rank_state_file(dp_rank: int, tp_rank: int) -> str:
    """Per-rank state of ours (the EMA/SWA partitions) beside DeepSpeed's files in a checkpoint."""
    return f"averages_dp{dp_rank}_tp{tp_rank}.pt"


def save(engine, ckpt_dir: str, step: int, run_state: dict[str, Any], keep: int, is_main: bool,
         rank_state: Optional[tuple[str, Any]] = None) -> str:
    """Collective: every rank calls it, with its own (file name, object) to add, if any.
    Returns the tag written."""
    tag = tag_for(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"run_state": run_state}, save_latest=False)
    if rank_state is not None:
        write_file_atomic(os.path.join(ckpt_dir, tag, rank_state[0]), serialize(rank_state[1]))
    barrier()
    if is_main:
        write_file_atomic(os.path.join(ckpt_dir, tag, RUN_STATE), json.dumps({"step": step, **run_state}, indent=1).encode())
        write_file_atomic(os.path.join(ckpt_dir, "latest"), tag.encode())  # what zero_to_fp32 reads by default
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def load(engine, ckpt_dir: str, tag: str) -> None:
    """Collective. Loads weights, optimizer state and engine counters of a complete checkpoint."""
    path, _ = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")


def load_rank_state(ckpt_dir: str, tag: str, name: str) -> Optional[Any]:
    path = os.path.join(ckpt_dir, tag, name)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------
# continual pretraining: a new run that starts from another run's weights


def resolve_init_source(path: str) -> str:
    """The weights folder `checkpoint.init_from` names: a checkpoints folder (its newest complete
    checkpoint), or a checkpoint, slot or averaged-model folder holding DeepSpeed *_states.pt files."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint.init_from: {path} does not exist (or is not a folder)")
    found = complete_checkpoints(path)
    if found:
        return os.path.join(path, found[-1][1])
    names = os.listdir(path)
    if any(name.endswith("_optim_states.pt") for name in names) or "config.json" in names:
        return path
    raise ValueError(f"checkpoint.init_from: {path} is neither a checkpoints folder with a complete checkpoint, "
                     f"a checkpoint/slot folder with DeepSpeed *_optim_states.pt files, nor a Hugging Face model folder")


def init_from(engine, par, source: str, keep_optimizer: bool, log) -> None:
    """Collective. Load another run's weights (and, if asked, its optimizer state) into this fresh
    engine; the run then starts at step 0 of its own schedule (a re-warmup, in the usual recipe)."""
    if keep_optimizer:
        if not os.path.isfile(os.path.join(source, RUN_STATE)):
            raise ValueError(f"checkpoint.init_optimizer: {source} is not a complete training checkpoint "
                             f"(no {RUN_STATE}); it has no optimizer state to keep")
        state = read_run_state(os.path.dirname(source), os.path.basename(source))
        if (state["dp"], state["tp"]) != (par.dp, par.tp):
            raise ValueError(f"checkpoint.init_optimizer: {source} was written with data {state['dp']} × tensor "
                             f"{state['tp']}, this run is data {par.dp} × tensor {par.tp}; optimizer state moves "
                             f"only between equal layouts (set checkpoint.init_optimizer=false to take the weights)")
        load(engine, os.path.dirname(source), os.path.basename(source))
        log(f"initialised weights and optimizer state from {source}")
        return
    from models.hf import read_weights

    full, _, _ = read_weights(source, need_config=False)  # each tensor's shape is checked on loading
    load_weights(engine, par, full)
    log(f"initialised weights from {source} (fresh optimizer state)")


def growth_source(args) -> str:
    """The checkpoint folder `growth.from_run` and `growth.at_tokens` pick."""
    path = os.path.abspath(args.from_run)
    if not os.path.isdir(path):
        raise ValueError(f"growth.from_run: {path} does not exist (or is not a folder)")
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    found = complete_checkpoints(ckpt_dir)
    if not found:
        if args.at_tokens is not None:
            raise ValueError(f"growth.at_tokens needs a run with checkpoints; {path} has none")
        return resolve_init_source(path)
    if args.at_tokens is None:
        return os.path.join(ckpt_dir, found[-1][1])
    fitting = [tag for _, tag in found if read_run_state(ckpt_dir, tag)["tokens"] <= args.at_tokens]
    if not fitting:
        first = read_run_state(ckpt_dir, found[0][1])["tokens"]
        raise ValueError(f"growth.at_tokens={args.at_tokens}: the oldest checkpoint kept in {ckpt_dir} is at "
                         f"{first} tokens")
    return os.path.join(ckpt_dir, fitting[-1])


def init_grown(engine, par, args, model_config, log) -> dict[str, Any]:
    """Collective. Start this run from a depth-grown copy of a trained smaller run (fresh optimizer).
    Returns what it grew from (folder, layers, the tokens the small run had seen)."""
    from models.growth import grow
    from models.hf import MODEL_FILE, find_run_dir, run_model_config
    from models.registry import config_to_dict

    source = growth_source(args)
    run_dir = find_run_dir(source)
    if run_dir is None:
        raise ValueError(f"growth.from_run: no {MODEL_FILE} above {source}: which model is it?")
    small = run_model_config(run_dir)
    grown_state, grown = grow(consolidate(source), small, args.factor, args.order)
    want, have = config_to_dict(grown), config_to_dict(model_config)
    diff = sorted(k for k in want if want[k] != have.get(k))
    if diff:
        raise ValueError(f"growth: {args.factor} × the source's {small.n_layer} layers gives "
                         + ", ".join(f"{k}={want[k]}" for k in diff) + "; this job's model has "
                         + ", ".join(f"{k}={have.get(k)}" for k in diff) + " (set model.* to match)")
    load_weights(engine, par, grown_state)
    log(f"initialised by growing {source} ({small.n_layer} -> {grown.n_layer} layers, {args.order}); fresh optimizer")
    tokens = None
    for name in (RUN_STATE, slots.MANIFEST):
        if os.path.isfile(os.path.join(source, name)):
            with open(os.path.join(source, name)) as f:
                tokens = json.load(f).get("tokens")
            break
    return {"source": source, "source_layers": small.n_layer, "source_tokens": tokens}


@torch.no_grad()
def load_weights(engine, par, full: dict[str, torch.Tensor]) -> None:
    """Put a full (consolidated, unsplit) fp32 state dict into a ZeRO-3 engine of any layout: each
    rank cuts its own tensor-parallel piece and data-parallel partition, into both the optimizer's
    fp32 master partition and the model's working partition."""
    shapes = engine._get_zero_param_shapes()
    master = slots.split_partitions(engine.optimizer.fp32_partitioned_groups_flat, shapes, par.dp)
    layout = tensor_parallel_layout(engine.module)
    params = dict(engine.module.named_parameters())
    missing = sorted(set(master) - set(full))
    if missing:
        raise ValueError(f"checkpoint.init_from: the source has no {missing[0]} (and {len(missing) - 1} more "
                         f"parameters): a different model?")
    for name, view in master.items():
        tensor = full[name]
        if name in layout:
            tensor = split_tensor(tensor, *layout[name], par.tp)[par.tp_rank]
        p = params[name]
        if tuple(tensor.shape) != tuple(p.ds_shape):
            raise ValueError(f"checkpoint.init_from: {name} is {tuple(full[name].shape)} in the source, this "
                             f"model needs {tuple(p.ds_shape)} per tensor-parallel rank")
        flat = tensor.reshape(-1).float()
        part = view.numel()
        padded = torch.zeros(part * par.dp, dtype=torch.float32)
        padded[: flat.numel()] = flat
        mine = padded[par.dp_rank * part: (par.dp_rank + 1) * part]
        view.copy_(mine)
        p.ds_tensor.data.copy_(mine.view_as(p.ds_tensor))
        if p.data.numel() == tensor.numel():  # gathered and kept whole (persistent): not re-gathered before use
            p.data.copy_(tensor.view_as(p.data))
