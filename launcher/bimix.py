"""BiMix, the bivariate data-mixing law (Ge et al., arXiv 2405.14908, Eq. 3): a source's held-out
loss as a function of its share r of the mixture and of the data trained on s,

    L_i(r_i, s) = A_i / r_i^alpha_i * (B_i / s^beta_i + C_i)

fitted source by source to the per-source losses of a few small proxy runs of different mixtures.
A_i multiplies B_i and C_i and is not identifiable on its own: it is fixed at 1 (B_i and C_i carry
it). s is measured in millions of training tokens. The fit minimises squared log residuals with
SciPy's trust-region-reflective least squares (the paper's choice), parameters kept >= 0.

Pure functions on lists of points; the command that reads run directories is launcher/mixture.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TOKENS_UNIT = 1e6  # s in millions of tokens: keeps B and beta in a well-scaled range


@dataclass(frozen=True)
class Point:
    run: str  # which proxy run (a mixture) it came from
    source: str
    share: float  # r_i: the source's share of that run's mixture
    tokens: float  # tokens the run had trained on at this evaluation
    loss: float  # the source's held-out loss there


@dataclass(frozen=True)
class Law:
    alpha: float
    B: float
    beta: float
    C: float

    def loss(self, share, tokens):
        s = np.asarray(tokens, dtype=np.float64) / TOKENS_UNIT
        return np.asarray(share, dtype=np.float64) ** -self.alpha * (self.B * s ** -self.beta + self.C)


def _initial(points: list[Point]) -> np.ndarray:
    losses = np.array([p.loss for p in points])
    s = np.array([p.tokens for p in points]) / TOKENS_UNIT
    return np.array([0.1, max(losses.max() - losses.min(), 1e-3) * s.min() ** 0.5, 0.5, 0.9 * losses.min()])


def fit(points: list[Point]) -> Law:
    """The law's four free parameters of one source, from its points (at least two distinct shares)."""
    from scipy.optimize import least_squares

    if len({p.source for p in points}) != 1:
        raise ValueError(f"fit: points of one source expected, got {sorted({p.source for p in points})}")
    shares = {p.share for p in points}
    if len(shares) < 2 or any(r <= 0 for r in shares):
        raise ValueError(f"fitting BiMix needs points at two or more positive shares of the source, got {sorted(shares)}")
    r = np.array([p.share for p in points])
    t = np.array([p.tokens for p in points])
    log_loss = np.log([p.loss for p in points])

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.log(Law(*theta).loss(r, t)) - log_loss

    result = least_squares(residuals, _initial(points), method="trf", bounds=([0, 0, 0, 0], [10, np.inf, 5, np.inf]),
                           x_scale="jac", max_nfev=20_000)
    return Law(*map(float, result.x))


def relative_errors(law: Law, points: list[Point]) -> np.ndarray:
    predicted = law.loss([p.share for p in points], [p.tokens for p in points])
    actual = np.array([p.loss for p in points])
    return np.abs(predicted - actual) / actual


def r_squared_log(law: Law, points: list[Point]) -> float:
    """R^2 of the fit on the log scale (the paper's Eq. 14 reports it so)."""
    actual = np.log([p.loss for p in points])
    predicted = np.log(law.loss([p.share for p in points], [p.tokens for p in points]))
    total = float(((actual - actual.mean()) ** 2).sum())
    return 1.0 - float(((actual - predicted) ** 2).sum()) / total if total > 0 else math.nan


@dataclass(frozen=True)
class HeldOutShare:
    source: str
    share: float
    tokens: float
    predicted: float
    measured: float  # the mean over the runs at that share (seeds), at their last evaluation

    @property
    def relative_error(self) -> float:
        return abs(self.predicted - self.measured) / self.measured


def by_source(points: list[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.source, []).append(p)
    return out


def leave_one_share_out(points_by_source: dict[str, list[Point]]) -> list[HeldOutShare]:
    """Each source's final loss at each of its shares, predicted by the law fitted without any
    point at that share (the paper's test on unseen mixtures; every seed of a mixture left out
    together); a share whose removal leaves fewer than two is skipped."""
    out = []
    for source, points in points_by_source.items():
        for share in sorted({p.share for p in points}):
            rest = [p for p in points if p.share != share]
            if len({p.share for p in rest}) < 2:
                continue
            mine = [p for p in points if p.share == share]
            last = max(p.tokens for p in mine)
            measured = [p.loss for p in mine if p.tokens == last]
            law = fit(rest)
            out.append(HeldOutShare(source, share, last, float(law.loss(share, last)), sum(measured) / len(measured)))
    return out


def predict(laws: dict[str, Law], shares: dict[str, float], tokens: float) -> dict[str, float]:
    """Each source's predicted loss for a proposed mixture (shares normalised) after `tokens`."""
    missing = sorted(set(laws) - set(shares))
    if missing:
        raise ValueError(f"--predict: no share given for {', '.join(missing)}")
    total = sum(shares[s] for s in laws)
    if any(shares[s] <= 0 for s in laws) or total <= 0:
        raise ValueError("--predict: every share must be positive (the law diverges at a share of 0)")
    return {s: float(law.loss(shares[s] / total, tokens)) for s, law in laws.items()}


def optimal_shares(laws: dict[str, Law], tokens: float, floor: float = 1e-3) -> dict[str, float]:
    """The mixture minimising the sum of the sources' predicted losses (BiMix's Eq. 16), on the
    simplex with every share at least `floor`."""
    from scipy.optimize import minimize

    names = list(laws)
    start = np.full(len(names), 1.0 / len(names))

    def total(r: np.ndarray) -> float:
        return float(sum(laws[n].loss(max(x, floor), tokens) for n, x in zip(names, r)))

    result = minimize(total, start, method="SLSQP", bounds=[(floor, 1.0)] * len(names),
                      constraints=[{"type": "eq", "fun": lambda r: r.sum() - 1.0}])
    r = np.clip(result.x, floor, 1.0)
    return dict(zip(names, (r / r.sum()).tolist()))
