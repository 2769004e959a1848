"""Decay shapes: progress through a decay (0 -> 1) to a factor (1 -> 0), with their integrals.

Shared by the learning-rate schedule (the cooldown's shape) and the schedule-derived merge weights
(averaging/lawa.py), which need each shape's mean over an interval. A new shape is one entry here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

DecayShape = Literal["cosine", "linear", "1-sqrt"]


@dataclass(frozen=True)
class Decay:
    factor: Callable[[float], float]  # 1 at progress 0, 0 at progress 1, never increasing
    integral: Callable[[float], float]  # the integral of `factor` from 0 to progress

    def mean(self, start: float, end: float) -> float:
        """The factor's mean over progress [start, end]."""
        if end <= start:
            return self.factor(start)
        return (self.integral(end) - self.integral(start)) / (end - start)


DECAYS: dict[str, Decay] = {
    "cosine": Decay(lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
                    lambda p: 0.5 * (p + math.sin(math.pi * p) / math.pi)),
    "linear": Decay(lambda p: 1.0 - p, lambda p: p - p * p / 2),
    # Hägele et al. 2024's cooldown: most of the drop comes early, then it flattens.
    "1-sqrt": Decay(lambda p: 1.0 - math.sqrt(p), lambda p: p - 2.0 / 3.0 * p ** 1.5),
}
