"""Mixture weights: how much of each source a training batch draws.

  weights   the sources' own `weight`s (normalised)
  natural   in proportion to each source's train tokens: what concatenating the corpora gives
  entropy   BiMix's training-free rule (Ge et al., arXiv 2405.14908, Eq. 12-13): each source's
            conditional entropy of the next token given the current one, H = -sum P(x, x') log P(x'|x)
            over the adjacent token pairs of its train split (plug-in counts, nats), and weights
            r_i = exp(H_i) / sum_j exp(H_j): the less predictable a source, the more of it is seen

Under `natural` and `entropy` a source's `weight` only says whether it is in the mixture (> 0) or
held out (0: scored, never trained on). The entropies are computed once, when the data is prepared,
and kept in the manifest; `python -m launcher.mixture weights` prints them for any sources.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

MIXTURES = ("weights", "natural", "entropy")
# Token pairs are counted in chunks of this many tokens: memory stays bounded by the distinct pairs.
CHUNK_TOKENS = 1 << 24


class BigramCounts:
    """Counts of adjacent token pairs over a stream fed in pieces (pairs across pieces included)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.pairs = np.zeros(0, dtype=np.int64)  # first * vocab_size + second, sorted
        self.counts = np.zeros(0, dtype=np.int64)
        self._last: int | None = None

    def reset(self) -> None:
        """The next tokens added do not continue the last ones (no pair across)."""
        self._last = None

    def add(self, tokens: np.ndarray) -> None:
        for start in range(0, len(tokens), CHUNK_TOKENS):
            chunk = np.asarray(tokens[start:start + CHUNK_TOKENS], dtype=np.int64)
            if self._last is not None:
                chunk = np.concatenate([[self._last], chunk])
            if len(chunk) >= 2:
                pairs, counts = np.unique(chunk[:-1] * self.vocab_size + chunk[1:], return_counts=True)
                self.merge(pairs, counts)
            self._last = int(chunk[-1])

    def merge(self, pairs: np.ndarray, counts: np.ndarray) -> None:
        """Adds counts of (sorted, distinct) pairs counted elsewhere (another process's share)."""
        if not len(self.pairs):
            self.pairs, self.counts = pairs, counts
            return
        merged, where = np.unique(np.concatenate([self.pairs, pairs]), return_inverse=True)
        total = np.bincount(where, weights=np.concatenate([self.counts, counts]), minlength=len(merged))
        self.pairs, self.counts = merged, total.astype(np.int64)  # float64 counts: exact below 2**53

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def conditional_entropy(self) -> float:
        """H(X_{t+1} | X_t) in nats: -sum_{x,x'} P(x, x') log P(x' | x)."""
        n = self.total
        if n == 0:
            raise ValueError("no token pairs counted: the conditional entropy needs at least two tokens")
        first = self.pairs // self.vocab_size
        first_counts = np.bincount(first, weights=self.counts, minlength=self.vocab_size)
        joint = self.counts / n
        return float(-(joint * np.log(self.counts / first_counts[first])).sum())


def conditional_entropy(pieces: Iterable[np.ndarray], vocab_size: int) -> float:
    counts = BigramCounts(vocab_size)
    for tokens in pieces:
        counts.add(tokens)
    return counts.conditional_entropy()


def entropy_weights(entropies: list[float]) -> list[float]:
    """BiMix's Eq. 13: a softmax of the entropies (in nats, temperature 1)."""
    top = max(entropies)
    e = [math.exp(h - top) for h in entropies]  # shifted: the same softmax, no overflow
    return [x / sum(e) for x in e]


def mixture_weights(mixture: str, given: list[float], manifest: dict) -> list[float]:
    """The normalised sampling weight of every source of a prepared data dir (0: held out)."""
    if mixture not in MIXTURES:
        raise ValueError(f"data.mixture: must be one of {', '.join(MIXTURES)}, got {mixture!r}")
    sources = manifest["sources"]
    if len(given) != len(sources):
        raise ValueError(f"data.sources: {len(given)} sources given for a data.dir prepared from {len(sources)}")
    inside = [i for i, w in enumerate(given) if w > 0]
    if mixture == "weights":
        values = {i: float(given[i]) for i in inside}
    elif mixture == "natural":
        values = {i: float(sources[i]["train_tokens"]) for i in inside}
    else:
        missing = [i for i in inside if "conditional_entropy" not in sources[i]]
        if missing:
            raise ValueError(f"data.mixture=entropy: the manifest of this data.dir has no conditional entropy for "
                             f"data.sources{missing} (prepared by an older launcher); prepare it again")
        values = dict(zip(inside, entropy_weights([sources[i]["conditional_entropy"] for i in inside])))
    total = sum(values.values())
    return [values.get(i, 0.0) / total for i in range(len(sources))]


def describe(names: list[str], weights: list[float], mixture: str) -> str:
    """'mixture (entropy): pydoc 0.31, stdlib 0.45, numbers 0.24; held out only: notes'."""
    inside = ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights) if w > 0)
    held = [n for n, w in zip(names, weights) if w == 0]
    return f"mixture ({mixture}): {inside}" + (f"; held out only: {', '.join(held)}" if held else "")
