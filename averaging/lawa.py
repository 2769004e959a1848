"""Latest-weight averaging (Kaddour 2022; Sanyal et al. 2023) and its schedule-derived relatives:
pure functions on tensors and shards, and the `lawa` config section that names the merges.

A *merge* is a window of the latest snapshots (`k` of them, or every one within `window_tokens`
of the newest) and a weighting. `uniform` is LAWA. `linear`, `cosine` and `1-sqrt` follow WSM
(Tian et al. 2025, arXiv 2507.17634): a merge of checkpoints θ_0..θ_n with weights c_j equals one
more stretch of training whose learning rate on interval i (between θ_{i-1} and θ_i) is the peak
times w_i = c_i + ... + c_n. Choosing w_i as the decay shape's mean over that interval (a window's
progress 0 -> 1 from its oldest to its newest snapshot) gives c_0 = 1 - w_1, c_j = w_j - w_{j+1},
c_n = w_n: the merge emulates that cooldown, for any spacing of the snapshots.

Averaging is linear and ZeRO-3 partitions every parameter the same way at every step, so the
weighted sum of each rank's flat fp32 partitions is that rank's partition of the merged model:
no rank ever needs the full weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Sequence

import torch

from core.config import need
from core.decay import DECAYS

Weighting = Literal["uniform", "linear", "cosine", "1-sqrt"]
RESERVED_NAMES = ("raw", "ema", "swa", "forecast")  # the other methods the sidecar scores


@dataclass
class MergeArgs:
    name: str = "lawa"  # names its eval.jsonl key (<name>_val_loss) and its best folder
    k: Optional[int] = None  # the latest k snapshots, `spacing` steps apart ...
    window_tokens: Optional[int] = None  # ... or every snapshot within this many tokens of the newest
    weights: Weighting = "uniform"  # uniform (LAWA), or the merge that emulates a linear/cosine/1-sqrt decay
    spacing: Optional[int] = None  # minimum steps between merged snapshots; None: lawa.spacing
    keep_best: bool = True  # keep the best-scoring merge as a committed slot

    def validate(self, key: str) -> None:
        need(re.fullmatch(r"[a-z][a-z0-9_]*", self.name) is not None,
             f"{key}.name: {self.name!r} must be lowercase letters, digits and _ (it names files and keys)")
        need(self.name not in RESERVED_NAMES, f"{key}.name: {self.name!r} is reserved for the sidecar's other scores")
        need(self.k is None or self.window_tokens is None, f"{key}: set k or window_tokens, not both")
        need(self.k is None or self.k >= 1, f"{key}.k: must be >= 1, got {self.k}")
        need(self.window_tokens is None or self.window_tokens > 0,
             f"{key}.window_tokens: must be > 0, got {self.window_tokens}")
        need(self.spacing is None or self.spacing >= 0, f"{key}.spacing: must be >= 0, got {self.spacing}")


@dataclass
class LawaArgs:
    k: int = 5  # number of latest snapshots averaged (the default merge, and merges that give neither k nor window)
    spacing: int = 0  # minimum steps between averaged snapshots; 0: snapshot.every
    merges: list[MergeArgs] = field(default_factory=list)  # empty: one merge, `lawa`: uniform over lawa.k
    # The merge whose score forecasts a cooldown (eval.jsonl's forecast_val_loss): a merge's name, none, or
    # auto: the first merge on a wsd or constant schedule, none on one that decays all along.
    forecast: str = "auto"

    def validate(self) -> None:
        need(self.k >= 1, f"lawa.k: must be >= 1, got {self.k}")
        need(self.spacing >= 0, f"lawa.spacing: must be >= 0, got {self.spacing}")
        for i, merge in enumerate(self.merges):
            merge.validate(f"lawa.merges[{i}]")
        names = [m.name for m in self.merges]
        dupes = sorted({n for n in names if names.count(n) > 1})
        need(not dupes, f"lawa.merges: names must differ, {dupes[0] if dupes else ''!r} is used twice")
        need(self.forecast in ("auto", "none") or self.forecast in ([m.name for m in self.merges] or ["lawa"]),
             f"lawa.forecast: {self.forecast!r} names none of the merges "
             f"({', '.join(names or ['lawa'])}); give one of them, auto or none")

    def resolve(self, snapshot_every: int, tokens_per_step: int) -> list[Merge]:
        """The merges in steps, as the sidecar selects them; the first is the headline (lawa_best/)."""
        merges = self.merges or [MergeArgs()]
        resolved = []
        for m in merges:
            spacing = m.spacing if m.spacing is not None else (self.spacing or snapshot_every)
            window = None if m.window_tokens is None else m.window_tokens // tokens_per_step
            resolved.append(Merge(name=m.name, weights=m.weights, spacing=max(spacing, 1),
                                  k=None if window is not None else (m.k or self.k),
                                  window_steps=window, keep_best=m.keep_best))
        return resolved


@dataclass
class Merge:
    """A merge resolved to steps: which snapshots it takes and with what weights."""

    name: str
    weights: Weighting
    spacing: int  # steps
    k: Optional[int] = None  # the latest k ...
    window_steps: Optional[int] = None  # ... or every one at most this many steps older than the newest
    keep_best: bool = True

    def select(self, steps: Iterable[int]) -> list[int]:
        """Oldest first."""
        chosen = select_spaced(steps, self.k if self.k is not None else len(set(steps)), self.spacing)
        if self.window_steps is not None and chosen:
            chosen = [s for s in chosen if chosen[0] - s <= self.window_steps]
        return chosen[::-1]

    def weights_for(self, steps: Sequence[int]) -> list[float]:
        return merge_weights(steps, self.weights)

    def describe(self) -> str:
        window = f"k={self.k}" if self.k is not None else f"window {self.window_steps} steps"
        return f"{self.name} ({self.weights}, {window}, spacing {self.spacing})"


def slots_needed(merge: Merge, snapshot_every: int) -> int:
    """Ring slots a merge needs: its snapshots (at the ring's spacing) plus one being written."""
    stride = -(-merge.spacing // snapshot_every)
    if merge.k is not None:
        return (merge.k - 1) * stride + 2
    return merge.window_steps // (stride * snapshot_every) + 2


def select_spaced(steps: Iterable[int], k: int, spacing: int) -> list[int]:
    """The newest step, then repeatedly the newest step at least `spacing` older than the last one
    taken, up to k steps; newest first. Fewer than k come back when the history is short."""
    chosen: list[int] = []
    for step in sorted(set(steps), reverse=True):
        if len(chosen) == k:
            break
        if not chosen or chosen[-1] - step >= spacing:
            chosen.append(step)
    return chosen


def merge_weights(steps: Sequence[int], weighting: str) -> list[float]:
    """Each snapshot's weight (steps oldest first; the weights sum to 1). See the module's doc."""
    n = len(steps)
    if n == 0:
        raise ValueError("nothing to merge")
    if list(steps) != sorted(set(steps)):
        raise ValueError(f"steps must be distinct and oldest first, got {list(steps)}")
    if weighting == "uniform":
        return [1.0 / n] * n
    if weighting not in DECAYS:
        raise ValueError(f"unknown weighting {weighting!r}")
    if n == 1:
        return [1.0]
    decay, span = DECAYS[weighting], steps[-1] - steps[0]
    progress = [(s - steps[0]) / span for s in steps]
    w = [decay.mean(progress[i - 1], progress[i]) for i in range(1, n)]  # w_1 .. w_{n-1}
    return [1.0 - w[0]] + [w[i] - w[i + 1] for i in range(len(w) - 1)] + [w[-1]]


def average_tensors(tensors: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Element-wise mean in fp32 (uniform: a sum, then one division; weighted: a sum of w_i * t_i)."""
    if not tensors:
        raise ValueError("nothing to average")
    if weights is not None and len(weights) != len(tensors):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    total = torch.zeros_like(tensors[0], dtype=torch.float32)
    for i, t in enumerate(tensors):
        if t.shape != total.shape:
            raise ValueError(f"cannot average tensors of shapes {tuple(total.shape)} and {tuple(t.shape)}")
        total.add_(t.to(torch.float32), alpha=1.0 if weights is None else weights[i])
    return total.div_(len(tensors)) if weights is None else total


def average_shards(shards: Sequence[Sequence[torch.Tensor]],
                   weights: Optional[Sequence[float]] = None) -> list[torch.Tensor]:
    """Average k shards, each a list of flat fp32 groups in the same layout."""
    if not shards:
        raise ValueError("nothing to average")
    groups = len(shards[0])
    if any(len(s) != groups for s in shards):
        raise ValueError(f"shards have different numbers of flat groups: {[len(s) for s in shards]}")
    return [average_tensors([s[g] for s in shards], weights) for g in range(groups)]


def add_weighted(total: Optional[list[torch.Tensor]], shard: Sequence[torch.Tensor],
                 weight: float) -> list[torch.Tensor]:
    """total + weight * shard, group by group in fp32 (a fresh total when None): a merge summed one
    shard at a time, so that several merges read each snapshot once and hold one sum each."""
    if total is None:
        return [g.to(torch.float32) * weight for g in shard]
    if len(total) != len(shard):
        raise ValueError(f"shards have different numbers of flat groups: {len(total)} and {len(shard)}")
    for t, g in zip(total, shard):
        if t.shape != g.shape:
            raise ValueError(f"cannot average tensors of shapes {tuple(t.shape)} and {tuple(g.shape)}")
        t.add_(g.to(torch.float32), alpha=weight)
    return total


def average_state_dicts(state_dicts: Sequence[dict[str, torch.Tensor]],
                        weights: Optional[Sequence[float]] = None) -> dict[str, torch.Tensor]:
    """Average full (consolidated) state dicts key by key; the single-process reference."""
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            missing, extra = set(keys) - set(sd), set(sd) - set(keys)
            raise ValueError(f"state dict {i} has different keys (missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]})")
    return {key: average_tensors([sd[key] for sd in state_dicts], weights) for key in keys}
