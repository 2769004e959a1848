"""The job config: one YAML file (plus `section.key=value` overrides) -> typed dataclasses.

Each component declares its own `*Args` dataclass next to its code; `JobConfig` composes them.
Every user mistake found here is a `ConfigError` whose message is one line naming the key.
The DeepSpeed config is generated from the job config, never written by hand.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from averaging.averages import EmaArgs, SwaArgs, scheduled_lr
from averaging.lawa import LawaArgs
from averaging.sidecar import DEVICES as SIDECAR_DEVICES
from averaging.sidecar import SidecarArgs
from models.growth import ORDERS as GROWTH_ORDERS
from models.growth import GrowthArgs
from launcher.checkpoint import CheckpointArgs
from launcher.data import DataArgs
from launcher.distributed import ParallelArgs
from launcher.metrics import LoggingArgs
from launcher.optim import OptimizerArgs
from launcher.schedule import DECAY_SHAPES, SCHEDULES, ScheduleArgs, lr_at
from launcher.snapshot import IF_BUSY, SnapshotArgs
from models.registry import FAMILIES, SIZES, ModelConfig, model_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JOB = REPO_ROOT / "jobs" / "tiny_cpu.yaml"
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A mistake in the job config or on the command line; the message names the key."""


@dataclass
class ModelArgs:
    size: str = "tiny"  # a named shape (models.registry.SIZES: GPT-2 or Pythia/GPT-NeoX); the fields below override it
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's vocabulary rounded up to a multiple of 64
    block_size: Optional[int] = None  # None: data.seq_len
    bias: bool = True
    dropout: float = 0.0


@dataclass
class TrainArgs:
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per rank per forward/backward; accumulation fills the rest
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 1337
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32 or bf16
    stop_at: Optional[int] = None  # checkpoint and stop after this step (the schedule still spans `steps`)


@dataclass
class EvalArgs:
    every: int = 100  # validation loss every this many steps, and at the end; 0: only at the end
    batches: int = 8  # micro-batches of held-out data per data-parallel rank
    tasks: list[str] = field(default_factory=list)  # zero-shot task files the sidecar scores at each commit
    task_limit: int = 0  # first N examples of each task; 0: all


@dataclass
class JobConfig:
    name: str = "tiny_cpu"
    run_dir: Optional[str] = None  # None: runs/<name>
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)
    snapshot: SnapshotArgs = field(default_factory=SnapshotArgs)
    lawa: LawaArgs = field(default_factory=LawaArgs)
    ema: EmaArgs = field(default_factory=EmaArgs)
    swa: SwaArgs = field(default_factory=SwaArgs)
    growth: GrowthArgs = field(default_factory=GrowthArgs)
    sidecar: SidecarArgs = field(default_factory=SidecarArgs)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir if self.run_dir is not None else str(Path("runs") / self.name)


# ---------------------------------------------------------------------------------------------
# dict -> dataclass, with types checked


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(inner, value, key)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        # YAML reads 1e6 as a string and users write 2.0e3; both are fine when integral.
        number = _number(value)
        if number is None or float(number) != int(number):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config field type {_type_name(tp)}")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def build_dataclass(cls: type, data: Any, key: str = "") -> Any:
    """Instantiate `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    where = key or "job"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in names:
            raise ConfigError(f"unknown key '{prefix}{name}' (known keys of {where}: {', '.join(names)})")
    return cls(**{name: _convert(hints[name], value, f"{prefix}{name}") for name, value in data.items()})


# ---------------------------------------------------------------------------------------------
# loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optimizer.lr=3e-4' -> (['optimizer', 'lr'], 3e-4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot read value {raw!r}: {str(e).splitlines()[0]}") from None
    return keys, value


def apply_override(raw: dict, keys: list[str], value: Any) -> None:
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[:i + 1])} is a value, not a section: cannot set {'.'.join(keys)}")
        node = child
    node[keys[-1]] = value


def merge_sections(base: dict, delta: dict) -> dict:
    """`delta` on top of `base`, section by section (lists and values are replaced whole)."""
    out = dict(base)
    for key, value in delta.items():
        out[key] = merge_sections(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_job_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A job file as a mapping; `base: other.yaml` (relative to this file) is read first and this
    file's sections are laid over it, so a recipe states only what it changes."""
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = path.parent / str(base)
    if not base_path.is_file():
        raise ConfigError(f"{path}: base job file not found: {base_path}")
    return merge_sections(read_job_file(base_path, seen + (path.resolve(),)), raw)


def load_job(path: str | Path | None = None, overrides: list[str] = ()) -> JobConfig:
    """Read a job file (default: the tiny CPU job), apply overrides, check types and combinations."""
    path = Path(path) if path is not None else DEFAULT_JOB
    if not path.is_file():
        raise ConfigError(f"job file not found: {path}")
    raw = read_job_file(path)
    for text in overrides:
        apply_override(raw, *parse_override(text))
    job = build_dataclass(JobConfig, raw)
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """Combinations that cannot work, caught before anything starts. Layout checks that need the
    world size live in `validate_layout`."""
    m, t, s, o, d = job.model, job.train, job.schedule, job.optimizer, job.data

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(m.size in SIZES, f"model.size: unknown size '{m.size}' (known: {', '.join(SIZES)})")
    shape = {**FAMILIES[SIZES[m.size]].sizes[m.size], **{k: v for k, v in (("n_layer", m.n_layer), ("n_head", m.n_head),
                                                        ("n_embd", m.n_embd)) if v is not None}}
    for k, v in shape.items():
        need(v > 0, f"model.{k}: must be positive, got {v}")
    need(shape["n_embd"] % shape["n_head"] == 0,
         f"model.n_embd={shape['n_embd']} is not divisible by model.n_head={shape['n_head']}")
    if SIZES[m.size] == "neox":
        rotary = int(shape["n_embd"] // shape["n_head"] * FAMILIES["neox"].config.rotary_pct)
        need(rotary % 2 == 0, f"model.n_embd/model.n_head: a {shape['n_embd'] // shape['n_head']}-dim head rotates "
                              f"{rotary} dims (25%), which must be even")
    need(0.0 <= m.dropout < 1.0, f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.block_size is not None:
        need(d.seq_len <= m.block_size, f"data.seq_len={d.seq_len} exceeds model.block_size={m.block_size}")
    need(d.seq_len > 0, f"data.seq_len: must be positive, got {d.seq_len}")
    need(len(d.sources) > 0, "data.sources: at least one source is needed")
    for i, src in enumerate(d.sources):
        need(src.weight >= 0, f"data.sources[{i}].weight: must be >= 0, got {src.weight}")
    need(any(src.weight > 0 for src in d.sources), "data.sources: at least one weight must be positive")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")

    need(o.lr > 0, f"optimizer.lr: must be positive, got {o.lr}")
    need(o.weight_decay >= 0, f"optimizer.weight_decay: must be >= 0, got {o.weight_decay}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optimizer.beta1/beta2: must be in [0, 1)")

    need(s.name in SCHEDULES, f"schedule.name: unknown schedule '{s.name}' (known: {', '.join(SCHEDULES)})")
    need(s.warmup_steps >= 0, f"schedule.warmup_steps: must be >= 0, got {s.warmup_steps}")
    need(0.0 <= s.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio: must be in [0, 1], got {s.min_lr_ratio}")
    if s.name in ("cosine", "linear"):
        decay_steps = s.decay_steps if s.decay_steps is not None else t.steps
        need(s.warmup_steps <= decay_steps,
             f"schedule.warmup_steps={s.warmup_steps} exceeds the decay length "
             f"({'schedule.decay_steps' if s.decay_steps is not None else 'train.steps'}={decay_steps})")
    if s.name == "wsd":
        need(s.cooldown_steps > 0, f"schedule.cooldown_steps: schedule.name=wsd needs a cooldown length > 0, "
                                   f"got {s.cooldown_steps}")
        need(s.cooldown_shape in DECAY_SHAPES, f"schedule.cooldown_shape: must be one of "
                                               f"{', '.join(DECAY_SHAPES)}, got '{s.cooldown_shape}'")
        begin = s.cooldown_start if s.cooldown_start is not None else t.steps - s.cooldown_steps
        need(begin >= s.warmup_steps,
             f"schedule: the cooldown would start at step {begin}, inside the {s.warmup_steps}-step warmup "
             f"(schedule.cooldown_start, or train.steps - schedule.cooldown_steps)")

    need(t.steps > 0, f"train.steps: must be positive, got {t.steps}")
    need(t.micro_batch_size > 0, f"train.micro_batch_size: must be positive, got {t.micro_batch_size}")
    need(t.global_batch_size > 0, f"train.global_batch_size: must be positive, got {t.global_batch_size}")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"train.global_batch_size={t.global_batch_size} is not divisible by "
         f"train.micro_batch_size={t.micro_batch_size}")
    need(t.grad_clip >= 0, f"train.grad_clip: must be >= 0, got {t.grad_clip}")
    need(t.precision in PRECISIONS, f"train.precision: must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    if t.stop_at is not None:
        need(0 < t.stop_at <= t.steps, f"train.stop_at={t.stop_at} must be in [1, train.steps={t.steps}]")

    p = job.parallel
    need(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage: must be 0, 1, 2 or 3, got {p.zero_stage}")
    need(p.tensor >= 1, f"parallel.tensor: must be >= 1, got {p.tensor}")
    need(shape["n_head"] % p.tensor == 0,
         f"model.n_head={shape['n_head']} is not divisible by parallel.tensor={p.tensor}")
    need(p.tensor == 1 or m.dropout == 0.0,
         "model.dropout must be 0 with parallel.tensor > 1 (dropout masks would differ across tensor-parallel ranks)")

    c = job.checkpoint
    need(c.every > 0, f"checkpoint.every: must be positive, got {c.every}")
    need(c.keep >= 1, f"checkpoint.keep: must be >= 1, got {c.keep}")
    need(c.init_from is not None or not c.init_optimizer, "checkpoint.init_optimizer needs checkpoint.init_from")
    g = job.growth
    need(g.factor >= 1, f"growth.factor: must be >= 1, got {g.factor}")
    need(g.order in GROWTH_ORDERS, f"growth.order: must be one of {', '.join(GROWTH_ORDERS)}, got '{g.order}'")
    need(g.from_run is None or c.init_from is None, "growth.from_run and checkpoint.init_from both say where "
                                                     "the weights come from: set one")
    need(g.from_run is not None or g.at_tokens is None, "growth.at_tokens needs growth.from_run")

    e, w = job.ema, job.swa
    need(e.half_life > 0, f"ema.half_life: must be positive, got {e.half_life}")
    need(e.decay is None or 0.0 < e.decay < 1.0, f"ema.decay: must be in (0, 1), got {e.decay}")
    need(e.every >= 1, f"ema.every: must be >= 1, got {e.every}")
    need(e.start_step >= 0 and w.start_step >= 0, "ema.start_step/swa.start_step: must be >= 0")
    need(w.lr is None or w.lr > 0, f"swa.lr: must be positive, got {w.lr}")
    need(not (e.enabled or w.enabled) or job.snapshot.every > 0,
         "ema.enabled/swa.enabled need snapshot.every > 0 (the averages are snapshotted beside the weights "
         "and scored by the sidecar)")
    need(job.eval.every >= 0, f"eval.every: must be >= 0, got {job.eval.every}")
    need(job.eval.batches > 0, f"eval.batches: must be positive, got {job.eval.batches}")
    for i, task in enumerate(job.eval.tasks):
        need(Path(task).is_file(), f"eval.tasks[{i}]: no such file: {task}")
    need(not job.eval.tasks or job.snapshot.every > 0,
         "eval.tasks are scored by the sidecar: they need snapshot.every > 0")
    need(job.eval.task_limit >= 0, f"eval.task_limit: must be >= 0, got {job.eval.task_limit}")
    need(job.logging.every > 0, f"logging.every: must be positive, got {job.logging.every}")

    snap, lawa, side = job.snapshot, job.lawa, job.sidecar
    need(snap.every >= 0, f"snapshot.every: must be >= 0, got {snap.every}")
    need(snap.slots >= 2, f"snapshot.slots: must be >= 2 (one is being written while others are read), got {snap.slots}")
    need(snap.if_busy in IF_BUSY, f"snapshot.if_busy: must be one of {', '.join(IF_BUSY)}, got '{snap.if_busy}'")
    need(snap.max_write_mb_per_s >= 0, f"snapshot.max_write_mb_per_s: must be >= 0, got {snap.max_write_mb_per_s}")
    need(lawa.k >= 1, f"lawa.k: must be >= 1, got {lawa.k}")
    need(lawa.spacing >= 0, f"lawa.spacing: must be >= 0, got {lawa.spacing}")
    need(side.device in SIDECAR_DEVICES, f"sidecar.device: must be one of {', '.join(SIDECAR_DEVICES)}, got '{side.device}'")
    need(side.restarts >= 0, f"sidecar.restarts: must be >= 0, got {side.restarts}")
    need(side.poll_seconds > 0, f"sidecar.poll_seconds: must be positive, got {side.poll_seconds}")
    if snap.every > 0:
        need(p.zero_stage == 3, f"snapshot.every={snap.every} needs parallel.zero_stage=3 "
                                f"(snapshots are ZeRO-3 partitions), got {p.zero_stage}")
        spacing = lawa.spacing or snap.every
        needed = (lawa.k - 1) * -(-spacing // snap.every) + 2
        need(snap.slots >= needed,
             f"snapshot.slots={snap.slots} cannot hold lawa.k={lawa.k} snapshots {spacing} steps apart at "
             f"snapshot.every={snap.every} plus one being written: needs at least {needed}")
    need(not side.enabled or snap.every > 0, "sidecar.enabled needs snapshot.every > 0 (the sidecar averages snapshots)")


def validate_layout(job: JobConfig, world_size: int) -> int:
    """World = TP x DP, and the global batch splits evenly; returns the gradient-accumulation steps."""
    tp = job.parallel.tensor
    if world_size % tp != 0:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor={tp}")
    dp = world_size // tp
    per_step = job.train.micro_batch_size * dp
    if job.train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={job.train.global_batch_size} is not divisible by "
            f"train.micro_batch_size × data-parallel size = {job.train.micro_batch_size} × {dp}")
    return job.train.global_batch_size // per_step


def resolve_model_config(job: JobConfig, tokenizer_vocab: int) -> ModelConfig:
    m = job.model
    vocab = m.vocab_size if m.vocab_size is not None else -(-tokenizer_vocab // 64) * 64
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})")
    if vocab % job.parallel.tensor != 0:
        raise ConfigError(f"model.vocab_size={vocab} is not divisible by parallel.tensor={job.parallel.tensor}")
    return model_config(m.size, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, vocab_size=vocab,
                        block_size=m.block_size if m.block_size is not None else job.data.seq_len,
                        bias=m.bias, dropout=m.dropout)


def learning_rate(job: JobConfig, step: int) -> float:
    """The job's learning rate for the update with 0-based index `step`: the schedule, with SWA's
    constant phase on top."""
    return scheduled_lr(step, lr_at(step, job.optimizer.lr, job.schedule, job.train.steps), job.swa)


def resolve_precision(job: JobConfig, device_type: str) -> str:
    if job.train.precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return job.train.precision


def deepspeed_config(job: JobConfig, dp_size: int, grad_accum: int, precision: str) -> dict:
    """The DeepSpeed config for this job; written to the run directory for reference."""
    zero: dict[str, Any] = {"stage": job.parallel.zero_stage}
    if job.parallel.zero_stage == 3:
        zero.update({
            "overlap_comm": True,
            "contiguous_gradients": True,
            # Small parameters (norms, biases) stay whole on every rank: gathering them costs more
            # than it saves.
            "stage3_param_persistence_threshold": 10_000,
        })
    return {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": job.train.micro_batch_size * grad_accum * dp_size,
        "gradient_clipping": job.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # Our optimizer is torch's AdamW, which ZeRO handles like its own.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def to_dict(job: JobConfig) -> dict:
    return dataclasses.asdict(job)


def dump_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(to_dict(job), sort_keys=False)


if __name__ == "__main__":
    # python -m launcher.config [--job FILE] [section.key=value ...]: print the resolved job config.
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Print a job's resolved config (every key, defaults filled in).")
    parser.add_argument("--job", default=None)
    parser.add_argument("--get", default=None, help="print one resolved value, e.g. run_dir or train.steps")
    parser.add_argument("overrides", nargs="*")
    cli = parser.parse_args()
    try:
        job = load_job(cli.job, cli.overrides)
        if cli.get == "run_dir":
            print(job.resolved_run_dir)
        elif cli.get:
            value: Any = to_dict(job)
            for key in cli.get.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise ConfigError(f"--get {cli.get}: no such key")
                value = value[key]
            print(value)
        else:
            print(dump_yaml(job), end="")
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
