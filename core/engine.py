"""The one DeepSpeed engine builder: the environment DeepSpeed is imported into, the config it is
given (training, and the sidecar's inference variant of it), and `zero.Init` + `initialize`.
The trainer, the LAWA sidecar and the benchmarks all build their engines here."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from core.deepspeed_compat import use_deepspeed

if TYPE_CHECKING:
    from core.distributed import Parallel

# Parameters of at most this many elements stay whole on every rank once gathered (DeepSpeed's
# stage3_param_persistence_threshold, default 1e5; their optimizer state stays partitioned). At GPT-2
# widths that is the norms and biases, whose per-use gathers cost more than their memory; at the CPU
# jobs' widths (32-128) it is most weight matrices too, so those runs gather little in forward and
# backward (their fp32 partitions, and so their snapshots, are cut as at any width).
PERSISTENCE_THRESHOLD = 10_000


def deepspeed_config(micro_batch_size: int, grad_accum: int, dp: int, grad_clip: float, zero_stage: int,
                     bf16: bool, hidden_size: Optional[int] = None) -> dict[str, Any]:
    """The training engine's config (the launcher writes it to the run directory for reference).
    With `hidden_size`, ZeRO-3's buckets are sized from the model's width (the rules DeepSpeed's
    own "auto" values follow in its Hugging Face integration) instead of its fixed defaults."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        zero.update({"overlap_comm": True, "contiguous_gradients": True,
                     "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD})
        if hidden_size is not None:
            zero.update({"reduce_bucket_size": hidden_size * hidden_size,
                         "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                         "stage3_param_persistence_threshold": 10 * hidden_size})
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
    """Training's config minus the optimizer, with every parameter partitioned: a parameter kept
    whole ("persistent") would not see new partitions loaded under it (the sidecar's use)."""
    config = {k: v for k, v in training_config.items() if k != "zero_allow_untested_optimizer"}
    zero = dict(config.get("zero_optimization", {}))
    zero.update({"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_model_persistence_threshold": 0})
    config["zero_optimization"] = zero
    config["bf16"] = {"enabled": bf16}
    return config


def build_engine(make_model: Callable[[], torch.nn.Module], config: dict[str, Any], par: Parallel,
                 make_optimizer: Optional[Callable[[torch.nn.Module], torch.optim.Optimizer]] = None):
    """Collective. The model built under `zero.Init` (partitioned as each module is constructed,
    never whole on any rank at ZeRO-3) and wrapped in a DeepSpeed engine."""
    deepspeed = use_deepspeed(par.device.type)
    zero3 = config["zero_optimization"]["stage"] == 3
    with deepspeed.zero.Init(config_dict_or_path=config, data_parallel_group=par.dp_group, mpu=par, enabled=zero3):
        model = make_model()
    optimizer = make_optimizer(model) if make_optimizer is not None else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=par)
    return engine
