"""What the offline merges share: the one-line refusal, each input's weight in order, and the
weighted average of one tensor in its input's dtype."""
from __future__ import annotations

from typing import Optional

import torch

from averaging import lawa

# Tensors are averaged in row blocks of at most this many elements: with k inputs, about k + 2
# such blocks are in memory at a time, whatever the size of the model.
BLOCK_ELEMENTS = 1 << 24


class UsageError(Exception):
    """A mistake in what we were asked to do: reported as one line, exit code 2."""


def mismatch(a: str, b: str, what: str) -> UsageError:
    return UsageError(f"cannot average {a} with {b}: {what}")


def in_order(weight: Optional[dict[str, float]], inputs: list[str]) -> Optional[list[float]]:
    """Each input's weight, in the order of `inputs` (None: uniform)."""
    return None if weight is None else [weight[p] for p in inputs]


def average_like(tensors: list[torch.Tensor], like: torch.Tensor, weights: Optional[list[float]]) -> torch.Tensor:
    """Floating tensors: the fp32 weighted sum in like's dtype. Others (counters, masks): like itself."""
    if not like.is_floating_point():
        return like
    return lawa.average_tensors(tensors, weights).to(like.dtype)


def oldest_first(paths: list[str], steps: list[Optional[int]]) -> list[str]:
    """The inputs by step, oldest first; as given when some input has no step."""
    if any(s is None for s in steps):
        return list(paths)  # no order to go by but the command line's
    return [p for _, p in sorted(zip(steps, paths), key=lambda sp: sp[0])]
