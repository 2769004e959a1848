"""Will a job fit a cluster? GPU memory per rank, host memory and /dev/shm per node, from the job
alone, and the same block at the start of every run with the machine's own figures.

    python -m launcher.plan --job JOB [overrides] --nodes N --gpus-per-node G \\
        [--gpu-mem-gb M] [--host-mem-gb H] [--shm-gb S]

Exit status 0 when everything fits, 1 when something does not (its line names the knobs that
would make it fit, each one tried), 2 for a bad job or flag (one line naming it). Every term and
its source: docs/training.md, "Will it fit". The ring's bytes are exact; the GPU and host figures
are estimates (DeepSpeed's own estimator, a published activation formula, stated allowances).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch

from averaging.lawa import slots_needed
from core.config import ArgumentParser, ConfigError, need
from core.distributed import Parallel
from core.run_dir import SHM
from launcher.config import JobConfig
from launcher.data.preparation import MANIFEST
from launcher.ring import is_node_local
from models.registry import ModelConfig, build_model

GiB = 2**30
# Allowances, not measurements: a CUDA process holds its context, NCCL's buffers and the caching
# allocator's slack on the GPU, and torch + CUDA + DeepSpeed resident in host memory, before its
# first tensor. Each trainer and each sidecar rank is such a process.
CUDA_OVERHEAD = 2 * GiB
PROCESS_HOST = 2 * GiB
# The ring may fill this share of its storage: NCCL's shared-memory transport and other jobs also
# write to /dev/shm, and a full tmpfs fails their writes too, not just the next snapshot.
RING_SHARE = 0.9


def size(n: float) -> str:
    if n >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 or n == 0 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Shape:
    """A model as the plan sees it: each module's own parameters, as (elements, split by tensor
    parallelism); DeepSpeed's "largest layer" is the largest module."""

    config: ModelConfig
    modules: tuple[tuple[tuple[int, bool], ...], ...]

    @property
    def params(self) -> int:
        return sum(n for module in self.modules for n, _ in module)

    def local(self, tp: int) -> int:
        """Parameters one tensor-parallel rank holds: 1/tp of each split one, all replicated ones."""
        return sum(n // tp if split else n for module in self.modules for n, split in module)

    def largest_layer(self, tp: int) -> int:
        return max(sum(n // tp if split else n for n, split in module) for module in self.modules)

    def partition(self, tp: int, dp: int, stage: int = 3) -> int:
        """fp32 elements of one rank's partition (padding included): at ZeRO-3 ceil(numel/dp) of each
        parameter, at ZeRO-1/2 a dp-th of the whole (core/flat_layout.py)."""
        if stage < 3:
            return -(-self.local(tp) // (2 * dp)) * 2
        return sum(-(-(n // tp if split else n) // dp) for module in self.modules for n, split in module)


def model_shape(config: ModelConfig) -> Shape:
    """The model's own modules built on the meta device (shapes, no memory), so the counts are the
    code's and not a second formula: the split marks are what models/tensor_parallel.py sets."""
    with torch.device("meta"):
        model = build_model(config)
    seen: set[int] = set()
    modules = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # a tied head counts once
        seen.update(id(p) for p in own)
        modules.append(tuple((p.numel(), hasattr(p, "tensor_parallel_dim")) for p in own))
    return Shape(config, tuple(modules))


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int  # training ranks per node
    gpu_mem: Optional[float]  # bytes per GPU (None: not known)
    host_mem: float  # bytes per node
    ring_room: Optional[float]  # bytes the ring's storage offers per node (None: not checked)
    ring_place: str = SHM  # where the ring goes
    ring_shared: bool = False  # one storage seen by every node: the ring's bytes add up over nodes
    device: str = "cuda"  # what the trainers run on
    world: Optional[int] = None  # None: nodes × gpus_per_node

    @property
    def ring_in_ram(self) -> bool:
        return is_node_local(self.ring_place) or os.path.abspath(self.ring_place) == SHM


@dataclass(frozen=True)
class Resource:
    name: str  # gpu, host, shm (ring, when it is not in /dev/shm)
    where: str  # per rank, per node, ...
    parts: tuple[tuple[str, float], ...]  # what makes up the need, in bytes
    have: Optional[float]  # None: not checked
    share: float = 1.0  # the part of `have` that may be used
    advice: tuple[str, ...] = ()  # the knobs, when it does not fit
    note: str = ""  # said instead of a verdict when there is nothing to check

    @property
    def need(self) -> float:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool:
        return self.have is None or self.need <= self.share * self.have

    def breakdown(self) -> str:
        terms = self.parts[0][0] if len(self.parts) == 1 else " + ".join(f"{label} {size(b)}" for label, b in self.parts)
        return f"{self.name} {self.where}: {terms} = {size(self.need)}"

    def verdict(self) -> str:
        if self.have is None:
            return f"{self.name}: {self.note}" if not self.parts else f"{self.name}: {size(self.need)} {self.where} — {self.note}"
        share = f" (it may use {self.share:.0%})" if self.share < 1 else ""
        head = f"{self.name}: {size(self.need)} of {size(self.have)} {self.where}{share}"
        return f"{head} — fits" if self.fits else f"{head} — does not fit: {', or '.join(self.advice)}"


@dataclass(frozen=True)
class Plan:
    header: tuple[str, ...]
    gpu: Resource
    host: Resource
    ring: Resource
    notes: tuple[str, ...] = ()
    zero_stage: int = 3  # the stage planned for (parallel.zero_stage, `auto` resolved)
    stage_reason: str = ""

    @property
    def fits(self) -> bool:
        return self.gpu.fits and self.host.fits and self.ring.fits

    def lines(self) -> list[str]:
        resources = (self.gpu, self.host, self.ring)
        return [*self.header, *(f"  {r.breakdown()}" for r in resources if r.parts),
                *(r.verdict() for r in resources), *self.notes]


def zero3_estimate(params: int, largest_layer: int, gpus_per_node: float, nodes: int) -> tuple[float, float]:
    """DeepSpeed's own ZeRO-3 estimate for our setup (no offload; zero.Init, as the trainer builds the
    model): (host bytes per node, GPU bytes per rank) = (4·largest·G·1.5, 4·largest + 18·params/(G·nodes))."""
    from core.deepspeed_compat import use_deepspeed_here

    use_deepspeed_here()  # never guess the accelerator with a warning
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=False,
        cpu_offload_params=False, zero_init=True, additional_buffer_factor=1.5)
    return cpu, gpu


def zero12_estimate(stage: int, params: int, gpus_per_node: float, nodes: int, width: int) -> tuple[float, float]:
    """ZeRO-1/2 (no offload): (host bytes per node, GPU bytes per rank). GPU: the working weights
    whole on every rank (`width` bytes each), the gradients whole (ZeRO-1) or a dp-th of them
    (ZeRO-2), and a dp-th of the fp32 master, its gradient and AdamW's two moments (16 bytes) —
    at 16-bit ZeRO-2 exactly DeepSpeed's estimate_zero2_model_states_mem_needs (2Ψ + 18Ψ/G). Host:
    its figure too, each rank building the whole model before DeepSpeed takes it (4Ψ × 1.5 per rank)."""
    dp = gpus_per_node * nodes
    grads = width * params if stage == 1 else width * params / dp
    return 4 * params * gpus_per_node * 1.5, width * params + grads + 16 * params / dp


def _resources(job: JobConfig, shape: Shape, cl: Cluster) -> tuple[dict[str, Resource], dict]:
    """The arithmetic (docs/training.md, "Will it fit"), without advice; ConfigError for a layout
    that cannot run. The job's parallel.zero_stage must be resolved (choose_stage)."""
    c, t, tp, R = shape.config, job.train, job.parallel.tensor, cl.gpus_per_node
    stage = job.parallel.zero_stage
    dp = job.parallel.data_parallel(cl.world or cl.nodes * R)
    accum = t.accumulation_steps(dp)
    E = 4 * shape.partition(tp, dp, stage)  # bytes of one rank's fp32 partition
    precision = t.resolved_precision(cl.device)
    width = 2 if precision == "bf16" else 4  # bytes of a weight, gradient or activation
    snap = job.snapshot.every > 0
    kinds = ["raw", *(k for k, on in (("ema", job.ema.enabled), ("swa", job.swa.enabled)) if on)] if snap else []
    sidecar = snap and job.sidecar.enabled
    sidecar_gpu = sidecar and cl.device == "cuda" and job.sidecar.device != "cpu"

    # DeepSpeed's estimators know nothing of tensor parallelism: each tensor-parallel slice is its own
    # model, partitioned over the dp ranks that hold that slice, G/tp of them on each node.
    if stage == 3:
        states_host, states = zero3_estimate(shape.local(tp), shape.largest_layer(tp), R / tp, cl.nodes)
        if width == 4:  # the estimator counts 16-bit weights and gradients: fp32 ones take 2 + 2 bytes more
            states += E
    else:
        states_host, states = zero12_estimate(stage, shape.local(tp), R / tp, cl.nodes, width)
    # Activations, Korthikanti et al. 2022 eq. 2 (tensor parallel, no sequence parallelism):
    # s·b·h·(10 + 24/t + 5·a·s/(h·t)) bytes per layer in 16-bit. The last term (attention scores,
    # softmax, its dropout: s² per head) is left out: F.scaled_dot_product_attention's fused GPU
    # kernels never store it. Checkpointing keeps each block's input, plus one block recomputed.
    b, s, h = t.micro_batch_size, job.data.seq_len, c.n_embd
    layer = s * b * h * (10 + 24 / tp) * width / 2
    acts = c.n_layer * s * b * h * width + layer if t.activation_checkpointing else c.n_layer * layer
    logits = b * s * c.vocab_size / tp * (width + 4)  # the step's 16-bit logits + their fp32 copy in the loss
    device = [("model states", states), ("activations", acts), ("logits", logits)]
    if job.ema.enabled and not job.ema.offload:
        device.append(("EMA", E))  # shard-local fp32 copies beside the weights (averaging/ema_swa.py)
    if job.swa.enabled:
        device.append(("SWA", E))
    # The sidecar's model: after ZeRO-3 its own ZeRO-3 engine (16-bit partitions, one gathered layer
    # and one prefetched); after ZeRO-1/2 the whole model, as the trainers hold it, and the fp32
    # partitions it all-gathers to load it; a forward (no grad) at the micro-batch.
    weights = width * E / 4 + 2 * width * shape.largest_layer(tp) if stage == 3 else (width + 4) * shape.local(tp)
    side = weights + layer + logits if sidecar else 0.0

    host = []
    restarts = job.snapshot.restarts
    if snap:  # pinned copies of the partition the background thread writes from, one per kind
        host.append(("snapshot buffers", R * E * (len(kinds) + (2 if restarts else 0))))
    if job.ema.enabled and job.ema.offload:
        host.append(("EMA (ema.offload)", R * E))
    if sidecar:
        # A running fp32 sum per merge; the shards it reads (raw, EMA, SWA) are mapped from the slot
        # files (averaging/slots.py), pages the ring already holds.
        host.append(("sidecar sums", R * E * len(job.merges())))
    host.append(("DeepSpeed zero.Init" if stage == 3 else "model build", states_host * tp))  # per slice
    host.append(("processes", R * PROCESS_HOST * (2 if sidecar else 1)))
    if cl.device == "cpu":  # no GPU: the trainers' tensors are host memory too (and the sidecar's, below)
        host.append(("trainers' tensors (cpu)", R * sum(n for _, n in device)))
    if side and not sidecar_gpu:
        host.append(("sidecar engine", R * side))
    gpu_parts = (*device, *((("sidecar", side + CUDA_OVERHEAD),) if sidecar_gpu else ()), ("CUDA", CUDA_OVERHEAD))

    copies = cl.nodes if cl.ring_shared else 1
    ring = R * E * len(kinds) * job.snapshot.slots * copies
    label = (f"{job.snapshot.slots} slots × {len(kinds)} ({' + '.join(kinds)}) × {size(R * E)} (a node's {R} "
             f"partition{'s' if R > 1 else ''})" + (f" × {cl.nodes} nodes" if cl.ring_shared else ""))
    if restarts:
        # Restart slots add AdamW's two moments; the ring keeps its newest restart slot beyond its
        # window too (launcher/snapshot.py: _recycle).
        held = -(-job.snapshot.slots // job.snapshot.restart_every) + 1
        ring += R * E * (2 * held + len(kinds)) * copies
        label += f" + {held} restart points × 2 moments + 1 kept beyond the window"
        if job.snapshot.replicate == "buddy" and cl.nodes > 1 and not cl.ring_shared:
            # The previous node's part of its newest restart slot (every kind and the moments), and
            # the next one arriving beside it (launcher/buddy.py).
            ring += 2 * R * E * (2 + len(kinds))
            label += " + 2 buddy copies of the previous node's part (kept, arriving)"
    if ring and cl.ring_in_ram:
        host.append(("the ring (/dev/shm is RAM)", ring))
    where = ("in all" if cl.ring_shared else "per node") + ("" if cl.ring_in_ram else f" in {cl.ring_place}")
    unchecked = "not checked here (snapshot.dir): the launcher checks its free space at start"
    resources = {
        "gpu": Resource("gpu", "per rank", gpu_parts, cl.gpu_mem) if cl.device == "cuda" else
        Resource("gpu", "per rank", (), None, note="none: training on cpu, its tensors are counted in host memory"),
        "host": Resource("host", "per node", tuple(host), cl.host_mem),
        "ring": Resource("shm" if cl.ring_in_ram else "ring", where, ((label, ring),) if ring else (),
                         cl.ring_room if ring else None, RING_SHARE, note=unchecked if ring else "not used (snapshot.every=0)"),
    }
    return resources, dict(dp=dp, accum=accum, E=E, kinds=kinds, precision=precision, sidecar=sidecar, stage=stage)


def choose_stage(job: JobConfig, shape: Shape, cl: Cluster, continues: Optional[int] = None) -> tuple[JobConfig, str]:
    """The job with parallel.zero_stage resolved, and why. `auto`: the stage of the checkpoint the
    run continues (`continues`: its optimizer state is laid out for that stage), else the lowest
    stage whose GPU and host memory fit — each stage up saves memory (ZeRO-2 partitions the
    gradients, ZeRO-3 the weights too) and costs communication (ZeRO-3 gathers every layer's
    weights in forward and backward); 3 when none fits (the plan then says what would). A stage set
    by the job is kept."""
    if job.parallel.zero_stage != "auto":
        return job, "set by parallel.zero_stage"
    if continues is not None:
        return _with(job, "parallel", zero_stage=continues), "auto: the stage of the checkpoint it continues"
    for stage in (1, 2, 3):
        candidate = _with(job, "parallel", zero_stage=stage)
        resources = _resources(candidate, shape, cl)[0]
        if resources["gpu"].fits and resources["host"].fits:
            lower = {1: "", 2: "; ZeRO-1 does not", 3: "; ZeRO-1 and 2 do not"}[stage]
            return candidate, f"auto: the lowest stage whose GPU and host memory fit{lower}"
    return _with(job, "parallel", zero_stage=3), "auto: no stage fits; the one that needs the least"


def _fits(job: JobConfig, cl: Cluster, shape: Shape, name: str) -> bool:
    try:
        shape.config.check(job.parallel.tensor)
        return _resources(job, shape, cl)[0][name].fits
    except (ConfigError, ValueError):  # a variant that cannot run at all does not fit either
        return False


def _with(job: JobConfig, section: str, **changes) -> JobConfig:
    return replace(job, **{section: replace(getattr(job, section), **changes)})


def _advice(job: JobConfig, shape: Shape, cl: Cluster, name: str) -> tuple[str, ...]:
    """Every single knob that alone makes resource `name` fit, each tried on the same arithmetic."""
    out: list[str] = []
    t, snap, R = job.train, job.snapshot, cl.gpus_per_node

    def first(label: str, candidates, variant) -> None:  # variant(x) -> (job, cluster)
        found = next((x for x in candidates if _fits(*variant(x), shape, name)), None)
        if found is not None:
            out.append(label.format(found))

    def one(label: str, j: JobConfig = job, c: Cluster = cl) -> None:
        first(label, [True], lambda _: (j, c))

    if name == "gpu":
        first("lower train.micro_batch_size to {}", range(t.micro_batch_size - 1, 0, -1),
              lambda m: (_with(job, "train", micro_batch_size=m), cl))
        if not t.activation_checkpointing:
            one("set train.activation_checkpointing=true", _with(job, "train", activation_checkpointing=True))
        first("raise parallel.tensor to {}", [n for n in range(job.parallel.tensor + 1, R + 1) if R % n == 0],
              lambda n: (_with(job, "parallel", tensor=n), cl))
        if job.ema.enabled and not job.ema.offload:
            one("set ema.offload=true", _with(job, "ema", offload=True))
        if snap.every and job.sidecar.enabled and job.sidecar.device != "cpu":
            one("set sidecar.device=cpu", _with(job, "sidecar", device="cpu"))
    elif snap.every:  # host or ring
        least = max([2, *(slots_needed(m, snap.every) for m in job.merges())])  # what the merges need
        first("lower snapshot.slots to {}", range(snap.slots - 1, least - 1, -1),
              lambda n: (_with(job, "snapshot", slots=n), cl))
        if name == "ring":  # unset, the launcher falls back to the run directory by itself (launcher/ring.py)
            out.append("set snapshot.dir to a disk with room" + (
                f" (left unset, the launcher puts it in {job.resolved_run_dir}/snapshots)"
                if cl.ring_in_ram and not snap.dir else ""))
        elif cl.ring_in_ram:
            one("set snapshot.dir to a disk", c=replace(cl, ring_place="disk", ring_room=None))
        for kind in ("ema", "swa"):
            if getattr(job, kind).enabled:
                one(f"turn {kind.upper()} off ({kind}.enabled=false)", _with(job, kind, enabled=False))
        if name == "host" and job.sidecar.enabled and len(job.merges()) > 1:
            one("score fewer merges (lawa.merges)", _with(job, "lawa", merges=job.lawa.merges[:1]))
    # More nodes: smaller partitions on each (not for a ring on storage every node shares).
    first("use {} nodes", range(cl.nodes + 1, 8 * cl.nodes + 1), lambda n: (job, replace(cl, nodes=n, world=None)))
    return tuple(out) or ("no single knob is enough: combine train.micro_batch_size, train.activation_checkpointing, "
                          "parallel.tensor or more nodes",)


def plan(job: JobConfig, config: ModelConfig, cl: Cluster, shape: Optional[Shape] = None,
         chosen: Optional[tuple[JobConfig, str]] = None) -> Plan:
    """What the job needs of the cluster, resource by resource, with the knobs for what does not
    fit. `chosen`: the job with its stage already chosen (choose_stage), and why."""
    shape = shape or model_shape(config)
    job, why = chosen or choose_stage(job, shape, cl)
    resources, k = _resources(job, shape, cl)
    resources = {name: r if r.fits else replace(r, advice=_advice(job, shape, cl, name)) for name, r in resources.items()}
    c, t = config, job.train
    count = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e9 else f"{shape.params / 1e6:.2f}M"
    header = [
        f"plan: {job.name}, {job.model.size} ({c.n_layer} layers × {c.n_embd} wide, {c.n_head} heads, vocab "
        f"{c.vocab_size}): {count} parameters, an fp32 copy {size(4 * shape.params)}",
        f"layout: {cl.nodes} node{'s' if cl.nodes > 1 else ''} × {cl.gpus_per_node} "
        f"{'GPU' if cl.device == 'cuda' else 'rank'}{'s' if cl.gpus_per_node > 1 else ''} = tensor {job.parallel.tensor} × data {k['dp']}; "
        f"{k['precision']}; {t.micro_batch_size} × {job.data.seq_len} tokens per micro-batch, {k['accum']} "
        f"accumulation steps{'; activation checkpointing' if t.activation_checkpointing else ''}",
        f"ZeRO stage {k['stage']} ({why}); partition: {k['E'] / 4 / 1e6:.2f}M fp32 elements per rank = "
        f"{size(k['E'])}, {size(cl.gpus_per_node * k['E'])} per node",
    ]
    notes = []
    keeping = [m for m in job.merges() if m.keep_best] if k["sidecar"] else []
    if keeping:  # lawa_best/ and merges/<name>/ live in the shared run directory, not in /dev/shm
        notes.append(f"note: the sidecar keeps each merge's best ({', '.join(m.name for m in keeping)}) as one fp32 "
                     f"copy, {size(4 * shape.params)} each, in the run directory (shared storage, not /dev/shm)")
    return Plan(tuple(header), resources["gpu"], resources["host"], resources["ring"], tuple(notes), k["stage"], why)


# ---------------------------------------------------------------------------------------------
# what the data allows

EPOCHS_WARNING = 4.0  # more passes over a source than this is said as a warning


def tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def data_lines(job: JobConfig, manifest: dict) -> list[str]:
    """What the run reads of its prepared data: each trained source's train tokens, the tokens the
    run's steps draw from it (by its mixture weight) and so the epochs; a warning line, naming the
    keys, for a source read more than EPOCHS_WARNING times."""
    from launcher.data.mixture import mixture_weights

    weights = mixture_weights(job.data.mixture, [s.weight for s in job.data.sources], manifest)
    names = job.data.source_names()
    read = job.train.steps * job.tokens_per_step
    how = f"{job.train.steps} steps × {job.train.global_batch_size} × {job.data.seq_len} tokens"
    parts, over = [], []
    for name, source, w in zip(names, manifest["sources"], weights):
        if w == 0:
            continue
        epochs = read * w / max(1, source["train_tokens"])
        parts.append(f"{name} {epochs:.2f} epochs of {tokens(source['train_tokens'])} train tokens")
        if epochs > EPOCHS_WARNING:
            over.append(f"{name} ({tokens(source['train_tokens'])} train tokens) {epochs:.1f} times")
    lines = [f"data: the run reads {tokens(read)} tokens ({how}): " + "; ".join(parts)]
    if over:
        lines.append(f"warning: data.sources and train.steps: the run reads {', '.join(over)}, more than "
                     f"{EPOCHS_WARNING:g} epochs: it learns the data by heart rather than the language; point "
                     f"data.sources at a larger corpus or lower train.steps")
    return lines


# ---------------------------------------------------------------------------------------------
# at the start of a run (the figures come from the machine and the ring: launcher/trainer.py)


def cluster_at_start(par: Parallel, gpu_mem: Optional[int], host_mem: int) -> Cluster:
    """The cluster a run starts on: its nodes and ranks, and each node's smallest figures."""
    hosts = list(dict.fromkeys(par.hosts))
    return Cluster(len(hosts), max(len(par.ranks_on(host)) for host in hosts), gpu_mem, host_mem, None,
                   device=par.device.type, world=par.world_size)


def ring_bytes(job: JobConfig, shape: Shape, cl: Cluster) -> int:
    """Free bytes a node-local ring needs on every node before the ring may go there: its size with
    the room the plan keeps to spare (RING_SHARE)."""
    return int(_resources(job, shape, replace(cl, ring_room=None))[0]["ring"].need / RING_SHARE)


def refuse_unfit_ring(result: Plan, root: str, named: bool) -> None:
    """A ring that cannot fit where it goes is refused at start (one line naming the knobs), not at
    every snapshot of the run. `named`: the job chose the place (snapshot.dir)."""
    ring = result.ring
    if ring.fits:
        return
    place = f"snapshot.dir={root}" if named else f"{root} (/dev/shm lacked room and snapshot.dir is unset)"
    raise ConfigError(
        f"the snapshot ring cannot fit: it needs {size(ring.need)} {ring.where.split(' in ')[0]} "
        f"({ring.parts[0][0]}) but {place} has room for {size(ring.have)} on the tightest node (free space plus "
        f"this run's slots there; the ring may use {RING_SHARE:.0%}): {', or '.join(ring.advice)}")


# ---------------------------------------------------------------------------------------------
# the command


def vocab_of(job: JobConfig) -> int:
    """The tokenizer's vocabulary as training will see it: model.vocab_size, else the prepared
    data's manifest, else data.tokenizer's, else the size data preparation trains."""
    if job.model.vocab_size is not None:
        return job.model.vocab_size
    manifest = os.path.join(job.data.dir, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            return int(json.load(f)["vocab_size"])
    if job.data.tokenizer is not None:
        from core.tokenizer import load_tokenizer

        try:
            return load_tokenizer(job.data.tokenizer).vocab_size
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.tokenizer: cannot read it ({e}); or set model.vocab_size") from None
    return job.data.vocab_size


def main(argv: Optional[list[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m launcher.plan", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node: training ranks per node")
    parser.add_argument("--gpu-mem-gb", type=float, default=79.0,
                        help="one GPU's memory in GiB as torch sees it (default 79: an 80 GB A100/H100 less what "
                             "the driver keeps; torch.cuda.get_device_properties(0).total_memory on a node says)")
    parser.add_argument("--host-mem-gb", type=float, default=1024.0,
                        help="host memory per node in GiB (default 1024, common on 8-GPU nodes)")
    parser.add_argument("--shm-gb", type=float, default=None,
                        help="room in /dev/shm per node in GiB (default: half of --host-mem-gb, Linux's default "
                             "tmpfs size; `df -h /dev/shm` on a node says)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    cli = parser.parse_intermixed_args(argv)
    shm = cli.host_mem_gb / 2 if cli.shm_gb is None else cli.shm_gb
    try:
        for flag, value in (("--nodes", cli.nodes), ("--gpus-per-node", cli.gpus_per_node),
                            ("--gpu-mem-gb", cli.gpu_mem_gb), ("--host-mem-gb", cli.host_mem_gb), ("--shm-gb", shm)):
            need(value > 0, f"{flag}: must be positive, got {value}")
        from launcher.config import load_job

        job = load_job(cli.job, cli.overrides)
        config = job.model.resolve(vocab_of(job), job.data.seq_len, job.parallel.tensor)
        place = job.snapshot.dir or SHM
        cl = Cluster(cli.nodes, cli.gpus_per_node, cli.gpu_mem_gb * GiB, cli.host_mem_gb * GiB,
                     shm * GiB if place == SHM or is_node_local(place) else None, ring_place=place)
        result = plan(job, config, cl)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.lines() + data_state(job)))
    return 0 if result.fits else 1


def data_state(job: JobConfig) -> list[str]:
    """The data lines of a prepared data dir, or why there are none yet."""
    from launcher.data.preparation import prepared

    try:
        manifest = prepared(job.data)
    except ValueError as e:
        return [f"data: {e}"]
    if manifest is None:
        return [f"data: {job.data.dir} is not prepared yet (lawa-prepare prints what the run reads of it)"]
    return data_lines(job, manifest)


if __name__ == "__main__":
    sys.exit(main())
