"""Deterministic batches from a prepared data dir: memory-mapped token shards, batches drawn as a
pure function of (seed, step, data-parallel rank, micro-batch), so a resumed run sees exactly the
batches it would have seen (on another data-parallel size, or micro-batch size, it draws other windows
from the same distribution); and a fixed held-out set per source. Train windows start anywhere and are
drawn with replacement, as nanoGPT draws them: a run shorter than an epoch still sees some tokens twice
(docs/lawa.md gives the default job's share)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from launcher.data.mixture import mixture_weights
from launcher.data.tokenized import open_shard

# The held-out windows are visited in a shuffled order that depends on the data only, never on
# the run's seed, so runs with different seeds are evaluated on the same text.
VAL_ORDER_SEED = 0x5EED


class _Split:
    """The memory-mapped shards of one split of one source (a window never spans two)."""

    def __init__(self, data_dir: str, shards: list[dict], dtype: str, window: int):
        self.window = window
        self.maps = [open_shard(data_dir, shard, dtype) for shard in shards if shard["tokens"]]
        lengths = np.array([m.shape[0] for m in self.maps], dtype=np.int64)
        self.longest = int(lengths.max()) if len(lengths) else 0
        # Train windows may start anywhere a window fits; val windows tile the shards.
        self.starts = np.cumsum(np.maximum(lengths - window + 1, 0))
        self.tiles = np.cumsum(lengths // window)

    @property
    def num_starts(self) -> int:
        return int(self.starts[-1]) if len(self.starts) else 0

    @property
    def num_tiles(self) -> int:
        return int(self.tiles[-1]) if len(self.tiles) else 0

    def _slice(self, cumulative: np.ndarray, k: int, stride: int) -> np.ndarray:
        shard = int(np.searchsorted(cumulative, k, side="right"))
        offset = (k - (int(cumulative[shard - 1]) if shard else 0)) * stride
        return self.maps[shard][offset:offset + self.window]

    def window_at(self, k: int) -> np.ndarray:
        return self._slice(self.starts, k, 1)

    def tile(self, k: int) -> np.ndarray:
        return self._slice(self.tiles, k, self.window)


def _normalised_weights(weights: list[float], sources: int) -> np.ndarray:
    if len(weights) != sources:
        raise ValueError(f"data.sources: {len(weights)} weights given for a data.dir prepared from "
                         f"{sources} sources")
    w = np.asarray(weights, dtype=np.float64)
    for i, x in enumerate(w):
        if not np.isfinite(x) or x < 0:
            raise ValueError(f"data.sources[{i}].weight={weights[i]}: must be a finite number >= 0")
    if w.sum() <= 0:
        raise ValueError("data.sources[*].weight: at least one weight must be positive")
    return w / w.sum()


def _as_tensors(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = np.stack(rows).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(tokens[:, :-1])), torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))


class TokenBatches:
    """Deterministic (x, y) batches of `seq_len` tokens from a prepared data dir."""

    def __init__(self, manifest: dict, data_dir: str, weights: list[float], seq_len: int, seed: int,
                 names: Optional[list[str]] = None):
        if seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len}: must be positive")
        if seed < 0:
            raise ValueError(f"seed={seed}: must be >= 0")
        self.manifest, self.seq_len, self.seed = manifest, seq_len, int(seed)
        self.sources = manifest["sources"]
        self.probs = _normalised_weights(weights, len(self.sources))
        self.names = names or [f"source{i}" for i in range(len(self.sources))]
        dtype = manifest["dtype"]
        window = seq_len + 1
        self._train = [_Split(data_dir, s["train_shards"], dtype, window) for s in self.sources]
        self._val = [_Split(data_dir, s["val_shards"], dtype, window) for s in self.sources]
        for i, s in enumerate(self.sources):
            if self.probs[i] == 0:
                continue  # never sampled, so its size does not matter
            for name, split in (("train", self._train[i]), ("val", self._val[i])):
                if split.num_starts == 0:
                    raise ValueError(f"data.seq_len={seq_len} is too large for data.sources[{i}] "
                                     f"({s['path']!r}): its longest {name} shard has {split.longest} "
                                     f"tokens, a window needs {window}")
        self._num_starts = np.array([t.num_starts for t in self._train], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["eos_id"])

    def train_batch(self, step: int, dp_rank: int, micro: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows, a function of (seed, step, dp_rank, micro) only."""
        if min(step, dp_rank, micro) < 0 or batch_size < 1:
            raise ValueError(f"train_batch(step={step}, dp_rank={dp_rank}, micro={micro}, "
                             f"batch_size={batch_size}): indices must be >= 0 and batch_size >= 1")
        rng = np.random.default_rng([self.seed, step, dp_rank, micro])
        sources = rng.choice(len(self.probs), size=batch_size, p=self.probs)
        starts = rng.integers(0, self._num_starts[sources])
        return _as_tensors([self._train[s].window_at(int(k)) for s, k in zip(sources, starts)])

    def held_out_sources(self) -> list[int]:
        """The sources scored on held-out windows: those sampled, and any held out only (weight 0)
        whose val split holds a window."""
        return [i for i, v in enumerate(self._val) if self.probs[i] > 0 or v.num_tiles > 0]

    def val_batches(self, source: int, dp_rank: int, dp_size: int, num_batches: int,
                    batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One source's held-out set: `dp_size * num_batches * batch_size` of its val windows in a
        fixed shuffled order (wrapping around when used up) that depends on the data only, never on
        the mixture or the seed, so runs of any mixture are scored on the same windows; rank r takes
        every dp_size-th of them starting at r (disjoint while there are enough), `num_batches` each."""
        if dp_size < 1 or not 0 <= dp_rank < dp_size or num_batches < 0 or batch_size < 1:
            raise ValueError(f"val_batches(dp_rank={dp_rank}, dp_size={dp_size}, num_batches="
                             f"{num_batches}, batch_size={batch_size}): invalid arguments")
        split = self._val[source]
        if split.num_tiles == 0:
            raise ValueError(f"data.sources[{source}] ({self.sources[source]['path']!r}) has no held-out window "
                             f"of {self.seq_len + 1} tokens")
        rows = num_batches * batch_size
        order = np.random.default_rng([VAL_ORDER_SEED, int(source)]).permutation(split.num_tiles)
        mine = order[np.arange(dp_rank, rows * dp_size, dp_size) % split.num_tiles]
        windows = [split.tile(int(k)) for k in mine]
        return [_as_tensors(windows[b * batch_size:(b + 1) * batch_size]) for b in range(num_batches)]

    def val_windows(self) -> int:
        """How many distinct held-out windows the scored sources have."""
        return sum(self._val[i].num_tiles for i in self.held_out_sources())



def job_batches(data, manifest: dict, seed: int) -> TokenBatches:
    """The batches of a job's `data` section (DataArgs), its mixture resolved against the manifest."""
    weights = mixture_weights(data.mixture, [s.weight for s in data.sources], manifest)
    return TokenBatches(manifest, data.dir, weights, data.seq_len, seed, names=data.source_names())


class Prefetcher:
    """A step's micro-batches, built in a background thread while the step before computes (and on
    GPU in pinned memory, so that their copy to the device does not block): the loader never makes
    the device wait. Batches are a pure function of the step, so this changes nothing but timing."""

    def __init__(self, batches: TokenBatches, dp_rank: int, micro_batches: int, batch_size: int, pin: bool):
        self.batches, self.dp_rank, self.micro_batches, self.batch_size, self.pin = \
            batches, dp_rank, micro_batches, batch_size, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._next: Optional[tuple[int, Future]] = None

    def _make(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = [self.batches.train_batch(step, self.dp_rank, m, self.batch_size) for m in range(self.micro_batches)]
        return [(x.pin_memory(), y.pin_memory()) for x, y in out] if self.pin else out

    def get(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._next is not None and self._next[0] == step:
            out = self._next[1].result()
        else:
            out = self._make(step)
        self._next = (step + 1, self._pool.submit(self._make, step + 1))
        return out
