"""Where a run's first weights come from, decided in one place (`restore`): its own newest
checkpoint that verifies; else the checkpoint it branches from; else a depth-grown copy of a
smaller run; else other weights (`checkpoint.init_from`: a checkpoint, slot, average or Hugging Face
folder); else its fresh initialisation.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from averaging import slots
from averaging.ema_swa import ShardAverages
from core import pickles
from core.config import ConfigError, FilePath, need
from core.deepspeed_compat import flat_layout, full_shape, kept_whole, local_shard, master_flat_groups, zero_stage
from core.distributed import Parallel
from core.flat_layout import views
from core.log import logger
from core.run_dir import RUN_STATE, RunDir, find_run_dir
from core.zero_checkpoint import RunState
from core.zero_folder import Cut, TensorSource, ZeroFolder, fill_flat_groups, tp_slice
from launcher.checkpoint import (
    CheckpointArgs,
    Verified,
    check_layout,
    complete_checkpoints,
    load,
    load_averages,
    newest_verified,
    set_aside,
    verify,
)
from launcher.ring import Ring
from launcher.ring_restart import resume_from_ring
from models.growth import Grown, Order
from models.registry import ModelConfig, config_to_dict, read_model_config
from models.tensor_parallel import tensor_parallel_layout


@dataclass
class GrowthArgs:
    from_run: Optional[FilePath] = None  # a trained run directory (or one checkpoint/slot folder of it) to grow from
    factor: int = 4  # grown depth = factor × the source's (Gstack's g; the paper recommends about 4)
    at_tokens: Optional[int] = None  # the source run's newest checkpoint at or before this many tokens; None: its newest
    order: Order = "stack"  # stack (block i <- i mod L) or interpolate (block i <- i // factor)

    def validate(self) -> None:
        need(self.factor >= 1, f"growth.factor: must be >= 1, got {self.factor}")
        need(self.from_run is not None or self.at_tokens is None, "growth.at_tokens needs growth.from_run")


@dataclass
class Start:
    step: int = 0
    tokens: int = 0
    resumed_from: Optional[str] = None  # the checkpoint folder this run continues
    grown_from: Optional[dict[str, Any]] = None  # what a grown run was grown from (for the report)


def restore(engine, par: Parallel, ckpt_dir: str, args: CheckpointArgs, growth: GrowthArgs,
            model_config: ModelConfig, averages: ShardAverages, ring: Optional[Ring] = None, run_dir: str = "") -> Start:
    """Collective. Resume from the newest of: a restart slot that run `run_dir` wrote in the snapshot
    `ring` (when given) and this run's newest checkpoint that verifies; else start from `checkpoint.branch_from`,
    `growth.from_run` or `checkpoint.init_from` (at most one is set: the job's validation); else
    keep the fresh initialisation."""
    if complete_checkpoints(ckpt_dir) and not args.resume:
        raise ConfigError(f"{ckpt_dir} holds checkpoints but checkpoint.resume is false: "
                          f"choose another run_dir or delete them")
    own = newest_verified(ckpt_dir, par) if args.resume else Verified(None, [])
    if ring is not None and args.resume:
        try:
            ring.check()  # still the folder opened and walked at start
        except PermissionError as e:
            raise ConfigError(f"snapshot ring: {e}") from None
        resumed = resume_from_ring(engine, par, ring.root, run_dir, RunState.read(own.path).step if own.path else -1,
                                   averages)
        if resumed is not None:
            set_aside(ckpt_dir, own, f"the ring's restart slot of step {resumed[0]}", par)
            return Start(*resumed)
    if own.failed and own.path is None:
        raise ConfigError(own.refusal(ckpt_dir))
    if own.path is not None:
        set_aside(ckpt_dir, own, os.path.basename(own.path), par)
        return continue_from(engine, par, own.path, averages, "resumed")
    with pickles.trusting(args.trust_pickle):
        if args.branch_from is not None:
            if not os.path.isfile(os.path.join(args.branch_from, RUN_STATE)):
                raise ConfigError(f"checkpoint.branch_from: {args.branch_from} is not a complete checkpoint "
                                  f"(no {RUN_STATE})")
            return continue_from(engine, par, args.branch_from, averages, "branched", "checkpoint.branch_from")
        if growth.from_run is not None:
            with unreadable_as_config_error("growth.from_run"):
                return Start(grown_from=initialize_grown(engine, par, growth, model_config))
        if args.init_from is not None:
            with unreadable_as_config_error("checkpoint.init_from"):
                initialize_from(engine, par, init_source(args.init_from), args.init_optimizer)
    return Start()


@contextlib.contextmanager
def unreadable_as_config_error(key: str):
    """A source whose files cannot be read (missing, truncated, not DeepSpeed's, not matching their
    checksums, holding code) is a bad input: one line naming the key and the file, not a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise ConfigError(f"{key}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def continue_from(engine, par: Parallel, checkpoint: str, averages: ShardAverages, verb: str,
                  key: Optional[str] = None) -> Start:
    """Collective. Weights, optimizer state, EMA/SWA, step and tokens of a complete checkpoint
    (verified here when `key` names where it came from; this run's own are verified before)."""
    state = check_layout(checkpoint, par, zero_stage(engine), key or "checkpoint",
                         "continue it on the same layout and ZeRO stage (parallel.zero_stage)")
    if key is not None:
        load_checked(engine, par, checkpoint, key)
    else:
        load(engine, checkpoint)
    if averages.enabled:
        load_averages(checkpoint, par, averages)
    logger.info(f"{verb} from {checkpoint} at step {state.step}")
    return Start(state.step, state.tokens, resumed_from=checkpoint)


def load_checked(engine, par: Parallel, checkpoint: str, key: str) -> None:
    """Collective: `load`, once the checkpoint verifies (one line naming `key` when it does not)."""
    problem = verify(checkpoint, par)
    if problem is not None:
        raise ConfigError(f"{key}: {problem}")
    load(engine, checkpoint)


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
        check_layout(source, par, zero_stage(engine), "checkpoint.init_optimizer", MOMENTS_NEED_LAYOUT)
        load_checked(engine, par, source, "checkpoint.init_optimizer")
        logger.info(f"initialised weights and optimizer state from {source}")
        return
    if keep_optimizer:
        moments = moments_for(source)
        check_layout(moments, par, zero_stage(engine), "checkpoint.init_optimizer", MOMENTS_NEED_LAYOUT)
        load_checked(engine, par, moments, "checkpoint.init_optimizer")  # the moments (and weights, replaced next)
        load_weights(engine, par, ZeroFolder(source))
        logger.info(f"initialised weights from {source} and optimizer state from {moments}")
        return
    from models.hf import weight_source

    weights, _, _ = weight_source(source, need_config=False)  # each tensor's shape is checked on loading
    load_weights(engine, par, weights)
    logger.info(f"initialised weights from {source} (fresh optimizer state)")


MOMENTS_NEED_LAYOUT = ("optimizer state moves only between equal layouts and ZeRO stages (set parallel.zero_stage "
                       "and the layout to the source's, or checkpoint.init_optimizer=false to take the weights)")


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
    fitting = [tag for _, tag in found if RunState.read(os.path.join(ckpt_dir, tag)).tokens <= args.at_tokens]
    if not fitting:
        first = RunState.read(os.path.join(ckpt_dir, found[0][1])).tokens
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
        tokens = RunState.read(source).tokens
    elif slots.is_committed(source):
        tokens = slots.read_manifest(source).tokens
    return {"source": source, "source_layers": small.n_layer, "source_tokens": tokens}


@torch.no_grad()
def load_weights(engine, par: Parallel, source: TensorSource) -> None:
    """Put full (unsplit) weights into an engine of any layout and ZeRO stage: each rank reads only
    its own cut into the optimizer's fp32 master partition (core.zero_folder.fill_flat_groups; from
    a ZeRO folder of the same layout that is exactly the bytes of the rank's own partition), then the
    model's working copy: at ZeRO-3 its chunk of each parameter (and the whole of those it keeps
    gathered), at ZeRO-1/2 its whole tensor-parallel slice of every parameter."""
    splits = tensor_parallel_layout(engine.module)
    params = dict(engine.module.named_parameters())
    layout = flat_layout(engine, par.dp)
    missing = sorted(set(layout.names()) - set(source.names()))
    if missing:
        raise ConfigError(f"checkpoint.init_from: the source has no {missing[0]} (and {len(missing) - 1} more "
                          f"parameters): a different model?")
    for name in layout.names():
        want = list(full_shape(params[name]))
        if name in splits:
            want[splits[name][0]] *= par.tp
        if list(source.shape(name)) != want:
            raise ConfigError(f"checkpoint.init_from: {name} is {tuple(source.shape(name))} in the source, this "
                              f"model needs {tuple(want)}")
    master = master_flat_groups(engine)
    fill_flat_groups(source, layout, Cut(par.dp_rank, par.dp, par.tp_rank, par.tp), splits, out=master)
    held = views(master, layout, par.dp_rank)
    for name in layout.names():
        p, split = params[name], splits.get(name)
        chunk = local_shard(p)
        if chunk is not None:  # ZeRO-3: this rank's chunk, padding zero
            elements, _ = held[name]
            chunk.data.view(-1).zero_()[: elements.numel()].copy_(elements)
        if chunk is None or kept_whole(p):
            p.data.copy_(tp_slice(source.tensor(name), split, par.tp_rank, par.tp).view_as(p.data))
    source.close()
