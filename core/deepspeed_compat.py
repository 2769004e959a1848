"""DeepSpeed as this project meets it, in one place: imported for a device (its accelerator chosen,
not guessed, and its per-step noise silenced). The process-group setup and the engine builder both
import it from here, and an upgrade of DeepSpeed starts here."""
from __future__ import annotations

import logging
import os
import warnings


def use_deepspeed(device_type: str):
    """DeepSpeed, imported for this device: its CPU accelerator chosen rather than guessed (with
    a warning), its per-step logging and the deprecation warnings of its collectives silenced."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives that newer torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return deepspeed


def use_deepspeed_here():
    """DeepSpeed for whatever this process runs on (a tool that reads its files, not a rank)."""
    import torch

    return use_deepspeed("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------
# the engine's insides this project reads: every private attribute of DeepSpeed's in one place


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def master_flat_groups(engine) -> list:
    """This rank's fp32 master weights, one flat tensor per (sub-)group, updated in place by each
    step: ZeRO-3's chunks of every parameter, or ZeRO-1/2's partition of each group's flat (padded
    to the partition size). The layout of either: `flat_layout`."""
    stage = zero_stage(engine)
    if stage == 3:
        return engine.optimizer.fp32_partitioned_groups_flat
    if stage in (1, 2):
        return engine.optimizer.single_partition_of_fp32_groups
    raise ValueError(f"ZeRO stage {stage} keeps no partitioned fp32 master weights")


def flat_layout(engine, dp: int):
    """How `master_flat_groups` lays the parameters out (core.flat_layout)."""
    from core.flat_layout import FlatLayout

    shapes = engine._get_zero_param_shapes()  # in flat order (ZeRO-2's round-robin order included)
    stage = zero_stage(engine)
    if stage == 3:
        return FlatLayout.zero3(shapes, dp)
    optimizer = engine.optimizer
    return FlatLayout(stage, dp, shapes, [list(p) for p in optimizer.round_robin_bit16_padding],
                      [int(size) for size in optimizer.partition_size])


def model_states(engine) -> dict:
    """What DeepSpeed's own model-states files record beside the flat groups: the module's state
    (buffers, and ZeRO-3's empty parameter placeholders), buffer names, tied aliases, shapes."""
    return {"module": engine.module_state_dict(), "buffer_names": engine._get_buffer_names(),
            "shared_params": engine._get_shared_params(), "param_shapes": engine._get_zero_param_shapes()}


def full_shape(param):
    """A parameter's shape, also under zero.Init (where its local tensor is an empty placeholder)."""
    return getattr(param, "ds_shape", param.shape)


def full_numel(param) -> int:
    return getattr(param, "ds_numel", param.numel())


def local_shard(param):
    """ZeRO-3: this rank's chunk of a parameter (the working copy the next forward gathers); None
    at stages 1-2, where every rank holds the whole parameter."""
    return getattr(param, "ds_tensor", None)


def kept_whole(param) -> bool:
    """ZeRO-3 keeps small parameters gathered after their first use (persistence threshold): those
    are not gathered again, so a new value must go into the whole tensor too."""
    return local_shard(param) is not None and param.data.numel() == param.ds_numel


def treat_as_leaves(model, classes: list) -> None:
    """ZeRO-3 fetches the parameters of each module of these classes once, on entry, and puts no
    hooks inside them (so a compiled block holds no graph break at every submodule)."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)


def optimizer_states(engine) -> list[dict]:
    """The inner optimizer's (AdamW's) state of each master flat group, in `master_flat_groups`
    order: exp_avg and exp_avg_sq shaped like the group, step a scalar tensor. Empty dicts before
    the first step."""
    inner = engine.optimizer.optimizer
    return [inner.state[flat] for flat in master_flat_groups(engine)]


def step_count_on_device(engine) -> bool:
    """Whether the inner AdamW keeps its step counts on the device (fused or capturable), not the CPU."""
    return any(group.get("fused") or group.get("capturable") for group in engine.optimizer.optimizer.param_groups)


def set_step_counters(engine, steps: int, samples: int) -> None:
    """The engine's own counters, as its load_checkpoint would leave them."""
    engine.global_steps = steps
    engine.global_samples = samples


def refresh_working_copy(engine, dp_group) -> None:
    """Collective over the data-parallel group, after the master partitions were written in place:
    the model's working weights from them. ZeRO-1/2: each rank's partition into the working flat,
    all-gathered (DeepSpeed's own update after a step). ZeRO-3: each rank's chunk into its working
    partition, and the parameters it keeps gathered (persistence threshold) gathered again."""
    import torch
    import torch.distributed as dist

    optimizer = engine.optimizer
    with torch.no_grad():
        if zero_stage(engine) in (1, 2):
            optimizer.update_lp_params()
            return
        for master, working in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat):
            working.data.copy_(master.data)
        for param in engine.module.parameters():
            if kept_whole(param):
                chunk = param.ds_tensor.data.view(-1)
                parts = [torch.empty_like(chunk) for _ in range(dist.get_world_size(dp_group))]
                dist.all_gather(parts, chunk, group=dp_group)
                param.data.copy_(torch.cat(parts)[: param.ds_numel].view_as(param.data))
