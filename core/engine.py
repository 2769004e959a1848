"""The one DeepSpeed engine builder: the environment DeepSpeed is imported into, the config it is
given (training, and the sidecar's inference variant of it), and `zero.Init` + `initialize`.
The trainer, the LAWA sidecar and the benchmarks all build their engines here."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from core import pickles
from core.deepspeed_compat import treat_as_leaves, use_deepspeed
from core.distributed import Parallel

# Parameters of at most this many elements stay whole on every rank once gathered (DeepSpeed's
# stage3_param_persistence_threshold, default 1e5; their optimizer state stays partitioned). At GPT-2
# widths that is the norms and biases, whose per-use gathers cost more than their memory; at the CPU
# jobs' widths (32-128) it is most weight matrices too, so those runs gather little in forward and
# backward (their fp32 partitions, and so their snapshots, are cut as at any width).
PERSISTENCE_THRESHOLD = 10_000


def deepspeed_config(micro_batch_size: int, grad_accum: int, dp: int, grad_clip: float, zero_stage: int,
                     bf16: bool, hidden_size: Optional[int] = None, compiled: bool = False) -> dict[str, Any]:
    """The training engine's config (the launcher writes it to the run directory for reference).
    With `hidden_size`, the buckets are sized from the model's width (the rules DeepSpeed's own
    "auto" values follow in its Hugging Face integration) instead of its fixed defaults. `compiled`:
    the model's blocks will be compiled (train.compile)."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage in (1, 2):
        zero["parameter_alignment"] = True
    if zero_stage == 2:
        zero.update({"overlap_comm": True, "contiguous_gradients": True})
    if zero_stage < 3 and hidden_size is not None:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if zero_stage == 3:
        zero.update({"overlap_comm": True, "contiguous_gradients": True,
                     "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD})
        if hidden_size is not None:
            zero.update({"reduce_bucket_size": hidden_size * hidden_size,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                         "stage3_param_persistence_threshold": 10 * hidden_size})
        if compiled:
            # At ZeRO-3 DeepSpeed replaces F.linear by an autograd Function of its own, whose gradient
            # torch 2.11's compiler loses: a compiled block's qkv and up projections get zeros from
            # the ops after them (its joint graph; bench/compile_breaks.py, 1.5e-3 off eager in 4
            # steps; exact under 2.13). A compiled block saves the parameters themselves for backward,
            # which DeepSpeed gathers again before the block's backward: torch's linear is as lean.
            zero["memory_efficient_linear"] = False
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # Our optimizer is torch's AdamW, which ZeRO handles like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def inference_config(training_config: dict[str, Any], bf16: bool) -> dict[str, Any]:
    """Training's config minus the optimizer (the sidecar's). After ZeRO-3 training, every
    parameter partitioned: a parameter kept whole ("persistent") would not see new partitions loaded
    under it. After ZeRO-1/2 training, whose ranks hold the whole model anyway, no partitioning
    (stage 0): each rank holds the whole model, as its trainer does."""
    config = {k: v for k, v in training_config.items() if k != "zero_allow_untested_optimizer"}
    zero = dict(config.get("zero_optimization", {}))
    if zero.get("stage") == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
    else:
        zero = {"stage": 0}
    config["zero_optimization"] = zero
    config["bf16"] = {"enabled": bf16}
    return config


def build_engine(make_model: Callable[[], torch.nn.Module], config: dict[str, Any], par: Parallel,
                 make_optimizer: Optional[Callable[[torch.nn.Module], torch.optim.Optimizer]] = None,
                 compile_backend: Optional[str] = None):
    """Collective. The model built under `zero.Init` at ZeRO-3 (partitioned as each module is
    constructed, never whole on any rank), wrapped in a DeepSpeed engine, and with `compile_backend`
    compiled where DeepSpeed's hooks allow one graph: at ZeRO-3 each transformer block as one unit
    (its parameters fetched once on entry, no hooks inside: core.deepspeed_compat.treat_as_leaves),
    at ZeRO-0/1/2, whose hooks run in backward only, the whole model."""
    deepspeed = use_deepspeed(par.device.type)
    zero3 = config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(config_dict_or_path=config, data_parallel_group=par.dp_group, mpu=par, enabled=zero3):
        model = make_model()
    if compile_backend and zero3:
        treat_as_leaves(model, [type(model.blocks[0])])  # before initialize, which puts the hooks on
    optimizer = make_optimizer(model) if make_optimizer is not None else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=par)
    pickles.route_deepspeed_loads(engine)  # its load_checkpoint reads weights-only, as every read here
    if compile_backend:  # the forward only: ZeRO-3's fetch/release hooks around a leaf block stay outside
        for unit in (engine.module.blocks if zero3 else [engine.module]):
            unit.forward = torch.compile(unit.forward, backend=compile_backend)
    return engine
