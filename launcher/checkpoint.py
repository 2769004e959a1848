"""Full, resumable checkpoints through DeepSpeed's `save_checkpoint`, keeping the last n; and
`restore`, the one place that decides where a run's first weights come from (its own checkpoint,
another run's weights, or a depth-grown smaller run).

A checkpoint counts only once every rank has written it: after DeepSpeed's save and a barrier,
the main rank writes `run_state.json` into the tag folder and then points `latest` at it, each
with an atomic rename. A crash mid-save leaves a folder without `run_state.json`, which resume
ignores, and `latest` still names the previous complete checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from averaging import slots
from averaging.ema_swa import ShardAverages
from core.config import ConfigError, need
from core.distributed import Parallel, barrier
from core.files import serialize, step_name, step_of, write_file_atomic, write_json_atomic
from core.log import logger
from core.run_dir import LATEST, RUN_STATE, RunDir, averages_file, find_run_dir
from core.zero_checkpoint import split_partitions
from core.zero_folder import Cut, TensorSource, ZeroFolder, tp_slice
from models.growth import Grown, Order
from models.registry import ModelConfig, config_to_dict, read_model_config
from models.tensor_parallel import tensor_parallel_layout


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
    # Also take optimizer state (same layout needed): a checkpoint's own; for a slot or an average (a merge in
    # lawa_best/ or merges/<name>/), the moments of its run's newest complete checkpoint at or before its step.
    # false: fresh AdamW moments.
    init_optimizer: bool = False
    # A cooldown branch (launcher/cooldown.py): continue another run's complete checkpoint (weights, optimizer
    # state, step and tokens) in this run directory, under this job's schedule.
    branch_from: Optional[str] = None

    def validate(self) -> None:
        need(self.every > 0, f"checkpoint.every: must be positive, got {self.every}")
        need(self.keep >= 1, f"checkpoint.keep: must be >= 1, got {self.keep}")
        need(self.init_from is not None or not self.init_optimizer, "checkpoint.init_optimizer needs checkpoint.init_from")
        need(self.branch_from is None or self.init_from is None,
             "checkpoint.branch_from and checkpoint.init_from both say where the weights come from: set one")


@dataclass
class GrowthArgs:
    from_run: Optional[str] = None  # a trained run directory (or one checkpoint/slot folder of it) to grow from
    factor: int = 4  # grown depth = factor × the source's (Gstack's g; the paper recommends about 4)
    at_tokens: Optional[int] = None  # the source run's newest checkpoint at or before this many tokens; None: its newest
    order: Order = "stack"  # stack (block i <- i mod L) or interpolate (block i <- i // factor)

    def validate(self) -> None:
        need(self.factor >= 1, f"growth.factor: must be >= 1, got {self.factor}")
        need(self.from_run is not None or self.at_tokens is None, "growth.at_tokens needs growth.from_run")


@dataclass
class RunState:
    """What a complete checkpoint records beside DeepSpeed's files (run_state.json)."""

    step: int
    tokens: int
    dp: int
    tp: int
    tensor_parallel_layout: dict[str, list[int]] = field(default_factory=dict)


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        step = step_of(name)
        if step is not None and os.path.isfile(os.path.join(ckpt_dir, name, RUN_STATE)):
            found.append((step, name))
    return sorted(found)


def read_run_state(checkpoint: str) -> RunState:
    with open(os.path.join(checkpoint, RUN_STATE)) as f:
        data = json.load(f)
    return RunState(**{k: data[k] for k in (f.name for f in dataclasses.fields(RunState)) if k in data})


def save(engine, ckpt_dir: str, state: RunState, keep: int, is_main: bool,
         averages: Optional[ShardAverages] = None, par: Optional[Parallel] = None) -> str:
    """Collective: every rank calls it (with its EMA/SWA, if any). Returns the tag written."""
    tag = step_name(state.step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"run_state": dataclasses.asdict(state)}, save_latest=False)
    if averages is not None and averages.enabled:
        write_file_atomic(os.path.join(ckpt_dir, tag, averages_file(par.dp_rank, par.tp_rank)),
                          serialize(averages.state_dict()))
    barrier()
    if is_main:
        write_json_atomic(os.path.join(ckpt_dir, tag, RUN_STATE), dataclasses.asdict(state))
        write_file_atomic(os.path.join(ckpt_dir, LATEST), tag)  # what zero_to_fp32 reads by default
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    barrier()
    return tag


def load(engine, checkpoint: str) -> None:
    """Collective. Loads weights, optimizer state and engine counters of a complete checkpoint."""
    path, _ = engine.load_checkpoint(os.path.dirname(checkpoint), tag=os.path.basename(checkpoint),
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint}")


# ---------------------------------------------------------------------------------------------
# where the first weights come from


@dataclass
class Start:
    step: int = 0
    tokens: int = 0
    resumed_from: Optional[str] = None  # the checkpoint folder this run continues
    grown_from: Optional[dict[str, Any]] = None  # what a grown run was grown from (for the report)


def restore(engine, par: Parallel, ckpt_dir: str, args: CheckpointArgs, growth: GrowthArgs,
            model_config: ModelConfig, averages: ShardAverages) -> Start:
    """Collective. Resume from this run's newest complete checkpoint; else start from
    `checkpoint.init_from` or `growth.from_run`; else keep the fresh initialisation."""
    found = complete_checkpoints(ckpt_dir)
    if found and not args.resume:
        raise ConfigError(f"{ckpt_dir} holds checkpoints but checkpoint.resume is false: "
                          f"choose another run_dir or delete them")
    if found:
        return continue_from(engine, par, os.path.join(ckpt_dir, found[-1][1]), averages, "resumed")
    if args.branch_from is not None:
        return continue_from(engine, par, args.branch_from, averages, "branched")
    if growth.from_run is not None:
        with unreadable_as_config_error("growth.from_run"):
            return Start(grown_from=initialize_grown(engine, par, growth, model_config))
    if args.init_from is not None:
        with unreadable_as_config_error("checkpoint.init_from"):
            initialize_from(engine, par, init_source(args.init_from), args.init_optimizer)
    return Start()


@contextlib.contextmanager
def unreadable_as_config_error(key: str):
    """A source whose files cannot be read (missing, truncated, not DeepSpeed's) is a bad input: one
    line naming the key and the file, not a traceback from the reader."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def continue_from(engine, par: Parallel, checkpoint: str, averages: ShardAverages, verb: str) -> Start:
    """Collective. Weights, optimizer state, EMA/SWA, step and tokens of a complete checkpoint."""
    if not os.path.isfile(os.path.join(checkpoint, RUN_STATE)):
        raise ConfigError(f"checkpoint.branch_from: {checkpoint} is not a complete checkpoint (no {RUN_STATE})")
    state = check_layout(checkpoint, par, "checkpoint", "continue it on the same layout")
    load(engine, checkpoint)
    if averages.enabled:
        path = os.path.join(checkpoint, averages_file(par.dp_rank, par.tp_rank))
        if os.path.isfile(path):
            averages.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        else:
            logger.info(f"note: {checkpoint} holds no EMA/SWA state; the averages start afresh")
    logger.info(f"{verb} from {checkpoint} at step {state.step}")
    return Start(state.step, state.tokens, resumed_from=checkpoint)


def init_source(path: str) -> str:
    """The weights folder `checkpoint.init_from` names: a checkpoints folder (its newest complete
    checkpoint), or a checkpoint, slot, averaged-model or Hugging Face folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint.init_from: {path} does not exist (or is not a folder)")
    found = complete_checkpoints(path)
    if found:
        return os.path.join(path, found[-1][1])
    committed = slots.committed_steps(path)
    if committed:  # lawa_best/ or merges/<name>/: its newest
        return slots.slot_path(path, committed[-1])
    names = os.listdir(path)
    if any(name.endswith("_optim_states.pt") for name in names) or "config.json" in names:
        return path
    raise ConfigError(f"checkpoint.init_from: {path} is neither a checkpoints folder with a complete checkpoint, "
                      f"a checkpoint/slot folder with DeepSpeed *_optim_states.pt files, nor a Hugging Face model folder")


def initialize_from(engine, par: Parallel, source: str, keep_optimizer: bool) -> None:
    """Collective. Another run's weights (and, if asked, its optimizer state) into this fresh
    engine; the run then starts at step 0 of its own schedule (a re-warmup, in the usual recipe)."""
    if keep_optimizer and os.path.isfile(os.path.join(source, RUN_STATE)):
        check_layout(source, par, "checkpoint.init_optimizer", MOMENTS_NEED_LAYOUT)
        load(engine, source)
        logger.info(f"initialised weights and optimizer state from {source}")
        return
    if keep_optimizer:
        moments = moments_for(source)
        check_layout(moments, par, "checkpoint.init_optimizer", MOMENTS_NEED_LAYOUT)
        load(engine, moments)  # the moments (and weights, replaced next)
        load_weights(engine, par, ZeroFolder(source))
        logger.info(f"initialised weights from {source} and optimizer state from {moments}")
        return
    from models.hf import weight_source

    weights, _, _ = weight_source(source, need_config=False)  # each tensor's shape is checked on loading
    load_weights(engine, par, weights)
    logger.info(f"initialised weights from {source} (fresh optimizer state)")


MOMENTS_NEED_LAYOUT = ("optimizer state moves only between equal layouts (set checkpoint.init_optimizer=false "
                       "to take the weights)")


def check_layout(checkpoint: str, par: Parallel, key: str, remedy: str) -> RunState:
    """The checkpoint's run state, once its data × tensor layout is known to be this run's."""
    state = read_run_state(checkpoint)
    if (state.dp, state.tp) != (par.dp, par.tp):
        raise ConfigError(f"{key}: {checkpoint} was written with data {state.dp} × tensor {state.tp}, this run is "
                          f"data {par.dp} × tensor {par.tp}; {remedy}")
    return state


def moments_for(source: str) -> str:
    """The checkpoint whose optimizer moments go with a slot or an average: its run's newest complete
    checkpoint at or before the slot's step."""
    if not slots.is_committed(source):
        raise ConfigError(f"checkpoint.init_optimizer: {source} is neither a complete checkpoint nor a committed "
                          f"slot or average; it has no optimizer state to go with")
    step = slots.read_manifest(source).step
    run = find_run_dir(source)
    ckpt_dir = run.checkpoints if run is not None else ""
    fitting = [tag for s, tag in complete_checkpoints(ckpt_dir) if s <= step]
    if not fitting:
        raise ConfigError(f"checkpoint.init_optimizer: no complete checkpoint at or before step {step} in "
                          f"{ckpt_dir or 'a run directory above ' + source} to take the optimizer moments from")
    return os.path.join(ckpt_dir, fitting[-1])


def growth_source(args: GrowthArgs) -> str:
    """The checkpoint folder `growth.from_run` and `growth.at_tokens` pick."""
    path = os.path.abspath(args.from_run)
    if not os.path.isdir(path):
        raise ConfigError(f"growth.from_run: {path} does not exist (or is not a folder)")
    run_checkpoints = RunDir(path).checkpoints
    ckpt_dir = run_checkpoints if os.path.isdir(run_checkpoints) else path
    found = complete_checkpoints(ckpt_dir)
    if not found:
        if args.at_tokens is not None:
            raise ConfigError(f"growth.at_tokens needs a run with checkpoints; {path} has none")
        return init_source(path)
    if args.at_tokens is None:
        return os.path.join(ckpt_dir, found[-1][1])
    fitting = [tag for _, tag in found if read_run_state(os.path.join(ckpt_dir, tag)).tokens <= args.at_tokens]
    if not fitting:
        first = read_run_state(os.path.join(ckpt_dir, found[0][1])).tokens
        raise ConfigError(f"growth.at_tokens={args.at_tokens}: the oldest checkpoint kept in {ckpt_dir} is at "
                          f"{first} tokens")
    return os.path.join(ckpt_dir, fitting[-1])


def initialize_grown(engine, par: Parallel, args: GrowthArgs, model_config: ModelConfig) -> dict[str, Any]:
    """Collective. Start this run from a depth-grown copy of a trained smaller run (fresh optimizer).
    Returns what it grew from (folder, layers, the tokens the small run had seen)."""
    source = growth_source(args)
    run = find_run_dir(source)
    if run is None:
        raise ConfigError(f"growth.from_run: no model.json above {source}: which model is it?")
    small = read_model_config(run.model)
    grown_weights = Grown(ZeroFolder(source), small, args.factor, args.order)
    want, have = config_to_dict(grown_weights.config), config_to_dict(model_config)
    diff = sorted(k for k in want if want[k] != have.get(k))
    if diff:
        raise ConfigError(f"growth: {args.factor} × the source's {small.n_layer} layers gives "
                          + ", ".join(f"{k}={want[k]}" for k in diff) + "; this job's model has "
                          + ", ".join(f"{k}={have.get(k)}" for k in diff) + " (set model.* to match)")
    load_weights(engine, par, grown_weights)
    logger.info(f"initialised by growing {source} ({small.n_layer} -> {grown_weights.config.n_layer} layers, "
                f"{args.order}); "
                f"fresh optimizer")
    tokens = None
    if os.path.isfile(os.path.join(source, RUN_STATE)):
        tokens = read_run_state(source).tokens
    elif slots.is_committed(source):
        tokens = slots.read_manifest(source).tokens
    return {"source": source, "source_layers": small.n_layer, "source_tokens": tokens}


@torch.no_grad()
def load_weights(engine, par: Parallel, source: TensorSource) -> None:
    """Put full (unsplit) weights into a ZeRO-3 engine of any layout, tensor by tensor: each rank
    reads only its own cut (its tensor-parallel slice's data-parallel partition) into both the
    optimizer's fp32 master partition and the model's working partition. From a ZeRO-3 folder of
    the same layout that is exactly the bytes of the rank's own partition."""
    shapes = engine._get_zero_param_shapes()
    master = split_partitions(engine.optimizer.fp32_partitioned_groups_flat, shapes, par.dp)
    layout = tensor_parallel_layout(engine.module)
    params = dict(engine.module.named_parameters())
    have = set(source.names())
    missing = sorted(set(master) - have)
    if missing:
        raise ConfigError(f"checkpoint.init_from: the source has no {missing[0]} (and {len(missing) - 1} more "
                          f"parameters): a different model?")
    cut = Cut(par.dp_rank, par.dp, par.tp_rank, par.tp)
    for name, view in master.items():
        p = params[name]
        split = layout.get(name)
        want = list(p.ds_shape)
        if split is not None:
            want[split[0]] *= par.tp
        if list(source.shape(name)) != want:
            raise ConfigError(f"checkpoint.init_from: {name} is {tuple(source.shape(name))} in the source, this "
                              f"model needs {tuple(want)}")
        mine = source.piece(name, split, cut)
        view.copy_(mine)
        p.ds_tensor.data.copy_(mine.view_as(p.ds_tensor))
        if p.data.numel() == p.ds_numel:  # gathered and kept whole (persistent): not re-gathered before use
            p.data.copy_(tp_slice(source.tensor(name), split, cut).view_as(p.data))
    source.close()
