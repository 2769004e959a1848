"""EMA and SWA of the weights, kept shard-local: each training rank averages its own fp32 master
partition (ZeRO-1, 2 or 3), so no parameter is ever gathered and the cost is one element-wise op
per update.

The math is pure functions on lists of flat tensors (any partition or whole state dict works);
`ShardAverages` is the thin stateful wrapper the training loop calls; `HostEma` keeps an offloaded
EMA in host memory without stalling the loop. LAWA, the third average, needs no trainer state: the
sidecar averages committed snapshots (averaging.lawa).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from core.config import need

KINDS = ("ema", "swa")


@dataclass
class EmaArgs:
    enabled: bool = False
    half_life: float = 1000.0  # steps after which a weight's contribution to the EMA has halved
    decay: Optional[float] = None  # per-update decay, instead of half_life (e.g. 0.999)
    start_step: int = 0  # the EMA starts as a copy of the weights after this step
    every: int = 1  # update every this many steps (the half-life stays in steps)
    offload: bool = False  # keep the EMA in host memory: frees device memory, costs a copy per update
    # Inverse-decay warmup (the LAWA paper's EMA, after @crowsonkb's): the update after k earlier ones
    # uses min(decay, 1 - (1 + k)^-warmup_power), so the first updates follow the weights closely.
    # None: the decay from the first update on.
    warmup_power: Optional[float] = None

    def validate(self) -> None:
        need(self.half_life > 0, f"ema.half_life: must be positive, got {self.half_life}")
        need(self.decay is None or 0.0 < self.decay < 1.0, f"ema.decay: must be in (0, 1), got {self.decay}")
        need(self.every >= 1, f"ema.every: must be >= 1, got {self.every}")
        need(self.start_step >= 0, f"ema.start_step: must be >= 0, got {self.start_step}")
        need(self.warmup_power is None or self.warmup_power > 0,
             f"ema.warmup_power: must be positive, got {self.warmup_power}")


@dataclass
class SwaArgs:
    enabled: bool = False
    start_step: int = 0  # uniform average of the weights at every `every` steps from this one on
    every: Optional[int] = None  # steps between the weights averaged; None: snapshot.every (the snapshot steps)
    lr: Optional[float] = None  # SWA's learning-rate phase: this constant LR from start_step; None: the schedule's

    def validate(self) -> None:
        need(self.start_step >= 0, f"swa.start_step: must be >= 0, got {self.start_step}")
        need(self.every is None or self.every >= 1, f"swa.every: must be >= 1, got {self.every}")
        need(self.lr is None or self.lr > 0, f"swa.lr: must be positive, got {self.lr}")


# ---------------------------------------------------------------------------------------------
# pure functions


def ema_decay(half_life: float, every: int) -> float:
    """Per-update decay so that a weight's contribution halves every `half_life` steps."""
    return 0.5 ** (every / half_life)


def warmed_decay(decay: float, updates: int, warmup_power: Optional[float]) -> float:
    """The decay of the EMA update that follows `updates` earlier ones (the first one, a copy, counts)."""
    if warmup_power is None:
        return decay
    return min(decay, 1.0 - (1.0 + updates) ** -warmup_power)


def ema_update_(average: list[torch.Tensor], weights: list[torch.Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * weights, in place, tensor by tensor."""
    for a, w in zip(average, weights):
        a.lerp_(w.to(a.device), 1.0 - decay)


def swa_update_(average: list[torch.Tensor], weights: list[torch.Tensor], count: int) -> None:
    """The running uniform mean: `average` of `count` weights becomes the mean of count + 1."""
    for a, w in zip(average, weights):
        a.lerp_(w.to(a.device), 1.0 / (count + 1))


def ema_reference(history: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """EMA of a whole weight history, written the slow obvious way (tests compare against it)."""
    average = [t.clone() for t in history[0]]
    for weights in history[1:]:
        average = [decay * a + (1.0 - decay) * w for a, w in zip(average, weights)]
    return average


def scheduled_lr(step: int, schedule_lr: float, swa: SwaArgs) -> float:
    """The learning rate with SWA's constant phase applied on top of the schedule."""
    if swa.enabled and swa.lr is not None and step >= swa.start_step:
        return swa.lr
    return schedule_lr


# ---------------------------------------------------------------------------------------------
# the stateful wrappers


class HostEma:
    """An EMA in host memory (ema.offload), updated off the training thread: the weights are copied
    into pinned staging buffers on a side stream (asynchronously; the next optimizer update waits
    for that copy on the device, `fence`), and a worker thread waits for the copy and does the
    host-side lerp while training goes on. `wait` fences any read of the EMA (a snapshot, a
    checkpoint) and the next update, which reuses the staging buffers. On CPU weights (no device)
    the copy is synchronous and only the lerp is moved off the training thread."""

    def __init__(self, weights: list[torch.Tensor]):
        self.on_device = weights[0].is_cuda
        self.ema = [torch.empty(w.shape, dtype=torch.float32, pin_memory=self.on_device) for w in weights]
        self.staging = [torch.empty(w.shape, dtype=torch.float32, pin_memory=self.on_device) for w in weights]
        for e, w in zip(self.ema, weights):
            e.copy_(w.detach())  # the first EMA is the weights (a synchronous copy, once)
        self.stream = torch.cuda.Stream(weights[0].device) if self.on_device else None
        self.copied: Optional[torch.cuda.Event] = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-ema")
        self.pending: Optional[Future] = None

    def update(self, weights: list[torch.Tensor], decay: float) -> None:
        self.wait()  # the staging buffers are free again
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(weights[0].device))
            with torch.cuda.stream(self.stream):
                for s, w in zip(self.staging, weights):
                    s.copy_(w.detach(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(self.stream)
        else:
            for s, w in zip(self.staging, weights):
                s.copy_(w.detach())
        self.pending = self.pool.submit(self._lerp, self.copied, 1.0 - decay)

    def _lerp(self, copied: Optional[torch.cuda.Event], weight: float) -> None:
        if copied is not None:
            copied.synchronize()
        for a, s in zip(self.ema, self.staging):
            a.lerp_(s, weight)

    def fence(self) -> None:
        """Before the optimizer update: the device waits for the copy of the weights in flight."""
        if self.copied is not None:
            torch.cuda.current_stream(self.stream.device).wait_event(self.copied)
            self.copied = None

    def wait(self) -> None:
        """Before the EMA is read or updated again: the host update in flight is done."""
        if self.pending is not None:
            self.pending.result()
            self.pending = None


class ShardAverages:
    """EMA and SWA of one rank's flat fp32 partition. Call `update(step)` after every optimizer
    step (`step` counts completed steps); snapshot steps also feed SWA."""

    def __init__(self, ema: EmaArgs, swa: SwaArgs, weights: list[torch.Tensor], snapshot_every: int):
        self.ema_args, self.swa_args = ema, swa
        self.weights = weights
        self.swa_every = swa.every or snapshot_every
        self.decay = ema.decay if ema.decay is not None else ema_decay(ema.half_life, ema.every)
        self.ema: Optional[list[torch.Tensor]] = None
        self.ema_updates = 0
        self.swa: Optional[list[torch.Tensor]] = None
        self.swa_count = 0
        self.host: Optional[HostEma] = None  # the EMA, when ema.offload keeps it in host memory

    @property
    def enabled(self) -> bool:
        return self.ema_args.enabled or self.swa_args.enabled

    def _fresh_copy(self) -> list[torch.Tensor]:
        return [w.detach().clone().float() for w in self.weights]

    def update(self, step: int) -> None:
        e, s = self.ema_args, self.swa_args
        if e.enabled and step >= e.start_step and (step - e.start_step) % e.every == 0:
            if self.ema is None and e.offload:
                self.host = HostEma(self.weights)
                self.ema = self.host.ema
            elif self.ema is None:
                self.ema = self._fresh_copy()
            elif self.host is not None:
                self.host.update(self.weights, self.current_decay)
            else:
                ema_update_(self.ema, [w.detach() for w in self.weights], self.current_decay)
            self.ema_updates += 1
        if s.enabled and step >= s.start_step and self.swa_every and step % self.swa_every == 0:
            if self.swa is None:
                self.swa = self._fresh_copy()
            else:
                swa_update_(self.swa, [w.detach() for w in self.weights], self.swa_count)
            self.swa_count += 1

    @property
    def current_decay(self) -> float:
        """The decay of the next EMA update."""
        return warmed_decay(self.decay, self.ema_updates, self.ema_args.warmup_power)

    def fence(self) -> None:
        """Before the optimizer update: nothing in flight still reads the weights (an offloaded EMA's copy)."""
        if self.host is not None:
            self.host.fence()

    def current(self) -> dict[str, list[torch.Tensor]]:
        """The averages that have started, by kind (an offloaded EMA once its update in flight is done)."""
        if self.host is not None:
            self.host.wait()
        out = {}
        if self.ema is not None:
            out["ema"] = self.ema
        if self.swa is not None:
            out["swa"] = self.swa
        return out

    def describe(self) -> dict[str, dict[str, Any]]:
        """What each current average is, for the snapshot manifest and the sidecar's log."""
        out = {}
        if self.ema is not None:
            out["ema"] = {"decay": self.decay, "every": self.ema_args.every,
                          "start_step": self.ema_args.start_step, "updates": self.ema_updates,
                          **({"warmup_power": self.ema_args.warmup_power} if self.ema_args.warmup_power else {})}
        if self.swa is not None:
            out["swa"] = {"start_step": self.swa_args.start_step, "every": self.swa_every, "count": self.swa_count}
        return out

    def state_dict(self) -> dict[str, Any]:
        if self.host is not None:
            self.host.wait()
        return {"ema": None if self.ema is None else [t.cpu() for t in self.ema], "ema_updates": self.ema_updates,
                "swa": None if self.swa is None else [t.cpu() for t in self.swa], "swa_count": self.swa_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for kind, count_key in (("ema", "ema_updates"), ("swa", "swa_count")):
            saved = state.get(kind)
            if saved is None:
                setattr(self, kind, None)
            else:
                if [t.numel() for t in saved] != [w.numel() for w in self.weights]:
                    raise ValueError(f"the checkpoint's {kind} partition does not match this model's layout")
                if kind == "ema" and self.ema_args.offload:
                    self.host = HostEma(self.weights)
                    buffers = self.host.ema
                else:
                    buffers = self._fresh_copy()
                for b, t in zip(buffers, saved):
                    b.copy_(t)
                setattr(self, kind, buffers)
            setattr(self, count_key, state.get(count_key, 0))
