"""Where a source's held-out split begins: the rule every source follows, whatever its format.

A source's stream of tokens is its documents in reading order. The last documents go to the
held-out (val) split until it holds `val_fraction` of the tokens, and at least one window of
seq_len + 1 tokens; the split falls between two documents. A source that cannot be split so (one
document, or a last document larger than the rest together) is cut inside the stream instead.
Counting tokens rather than documents keeps the held-out set its intended size when documents vary
in length. A nanoGPT folder with its own val.bin keeps that as its held-out split.
"""
from __future__ import annotations

import math

import numpy as np


def train_tokens(ends: np.ndarray, val_fraction: float, window: int, what: str) -> int:
    """How many leading tokens form the train split. `ends`: the token position just after each
    document (ascending; the last is the stream's length); `what` names the source in errors."""
    n = len(ends)
    total = int(ends[-1]) if n else 0
    held = max(window, math.ceil(total * val_fraction))
    if n >= 2:
        n_train = min(n - 1, int(np.searchsorted(ends, total - held, side="right")))
        if n_train >= 1 and ends[n_train - 1] >= window:
            return int(ends[n_train - 1])
    cut = total - held
    if cut < window:
        raise ValueError(f"{what} is too small: {total} tokens in {n} documents, but data.seq_len={window - 1} needs "
                         f"windows of {window} tokens in both its train and val split (at least {2 * window} tokens)")
    return cut


def documents_split(ends: np.ndarray, cut: int) -> tuple[int, int]:
    """(train documents, val documents) for a cut at token `cut`: a document cut in two counts in both."""
    after = int(np.searchsorted(ends, cut, side="right"))  # documents that end by the cut
    cut_inside = after < len(ends) and (after == 0 or int(ends[after - 1]) != cut)
    return after + cut_inside, len(ends) - after
