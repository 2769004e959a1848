"""What the merges forecast, and how well: a real cooldown from step S for D steps (a branch,
launcher/cooldown.py) against what each merge scored at step S + D in its parent — the same
compute, the same batches, the parent still at its peak learning rate — and the end-of-run text
that sets them out: a short table of each merge minus raw, the forecast errors, and one sentence
that says what the numbers show.

A merge of the last D steps' snapshots weighted like a decay approximates that decay (WSM, arXiv
2507.17634): its score at S + D forecasts a cooldown from S. The forecast error of merge m for a
cooldown (S, D) is m's score at S + D minus the cooldown's loss at S + D (positive: the merge
forecast a loss higher than the cooldown reached).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from averaging.sidecar.protocol import scored_methods
from core.files import read_jsonl
from core.run_dir import RunDir
from launcher.branch import Branch, branches_of

MOST_ROWS = 12  # the end-of-run table's scored steps, at most (the last always among them)


@dataclass
class Cooldown:
    path: str
    branch: Branch
    losses: list[tuple[int, float]]  # (step, val loss) of the branch's evaluations

    @property
    def final(self) -> Optional[float]:
        return self.losses[-1][1] if self.losses and self.losses[-1][0] == self.branch.end_step else None


def cooldowns_of(run_dir: str) -> list[Cooldown]:
    """Every cooldown branched from `run_dir`, by step, with the losses its own evaluations logged."""
    return [Cooldown(path, branch, [(r["step"], r["val_loss"]) for r in read_jsonl(RunDir(path).metrics)
                                    if "val_loss" in r and r["step"] > branch.step])
            for path, branch in branches_of(run_dir)]


@dataclass
class Forecast:
    """A finished cooldown beside each method's score at its end step in the parent."""

    cooldown: Cooldown
    scores: dict[str, float]  # method (raw and each merge) -> its score at the cooldown's end step

    @property
    def errors(self) -> dict[str, float]:
        """Each merge's forecast error: its score minus the cooldown's loss (raw's is the decay's gain)."""
        return {m: v - self.cooldown.final for m, v in self.scores.items()}


def forecasts(records: list[dict[str, Any]], cooldowns: list[Cooldown]) -> list[Forecast]:
    """The finished cooldowns whose end step the sidecar scored, each with the methods scored there."""
    by_step = {r["step"]: r for r in records}
    out = []
    for cd in cooldowns:
        record = by_step.get(cd.branch.end_step)
        if cd.final is None or record is None:
            continue
        out.append(Forecast(cd, {m: record[f"{m}_val_loss"] for m in scored_methods(records)
                                 if f"{m}_val_loss" in record}))
    return out


def shown(records: list[dict[str, Any]], most: int = MOST_ROWS) -> list[dict[str, Any]]:
    """Every n-th record, n chosen from the run's length so at most `most` rows, and the last."""
    every = max(1, math.ceil(len(records) / most))
    rows = records[::-1][::every][::-1]
    return rows


def eval_table(records: list[dict[str, Any]], forecast: Optional[str]) -> str:
    """Raw's loss and each merge minus raw (negative: better than raw), at the rows `shown` picks."""
    methods = scored_methods(records)[1:]
    names = [f"{m} (forecast)" if m == forecast else m for m in methods]
    lines = ["| step | raw |" + "".join(f" {n} − raw |" for n in names), "|---:|---:|" + "---:|" * len(methods)]
    for r in shown(records):
        gaps = [f" {r[f'{m}_val_loss'] - r['raw_val_loss']:+.4f} |" if f"{m}_val_loss" in r else " – |"
                for m in methods]
        lines.append(f"| {r['step']} | {r['raw_val_loss']:.4f} |" + "".join(gaps))
    return "\n".join(lines)


def forecast_table(found: list[Forecast], forecast: Optional[str]) -> str:
    """Per cooldown: its loss, raw's at the same step, and each merge's forecast error."""
    merges = [m for m in found[0].scores if m != "raw"]
    names = [f"{m} (forecast)" if m == forecast else m for m in merges]
    lines = ["| cooldown | ends at | cooldown loss | raw − cooldown |" + "".join(f" {n} − cooldown |" for n in names),
             "|---|---:|---:|---:|" + "---:|" * len(merges)]
    for f in found:
        b, errors = f.cooldown.branch, f.errors
        cells = [f" {errors[m]:+.4f} |" if m in errors else " – |" for m in merges]
        lines.append(f"| {b.shape}, {b.cooldown_steps} steps from {b.step} | {b.end_step} | {f.cooldown.final:.4f} | "
                     f"{errors['raw']:+.4f} |" + "".join(cells))
    return "\n".join(lines)


def verdict(records: list[dict[str, Any]], found: list[Forecast], forecast: Optional[str],
            stable_phase: Optional[tuple[int, int]]) -> str:
    """A few sentences of what the numbers show, whatever they show. `stable_phase`: (warmup's last
    step, stable phase's last step), or None for a schedule that decays all along."""
    first, stable_end = stable_phase if stable_phase is not None else (0, None)
    stable = [r for r in records if first < r["step"] and (stable_end is None or r["step"] <= stable_end)]
    phase = "over the run" if stable_phase is None else f"through the stable phase (steps {first + 1}–{stable_end})"
    parts = []
    for m in scored_methods(records)[1:]:
        gaps = [(r[f"{m}_val_loss"] - r["raw_val_loss"], r["step"]) for r in stable if f"{m}_val_loss" in r]
        if not gaps:
            continue
        ahead = [g for g in gaps if g[0] < 0]
        best = min(gaps)
        lead = f" (by up to {-best[0]:.3f}, step {best[1]})" if ahead else ""
        parts.append(f"{m} scored below raw at {len(ahead)} of {len(gaps)} steps{lead}")
    text = (phase[0].upper() + phase[1:] + ", " + "; ".join(parts) + ".") if parts else ""
    if found:
        merges = [m for m in found[0].scores if m != "raw"]
        judged = ([forecast] if forecast in merges else merges) + ["raw"]
        misses = []
        for m in judged:
            errors = [f.errors[m] for f in found if m in f.errors]
            name = f"{m} (the forecast)" if m == forecast else m
            misses.append(f"{name} {mean_abs(errors):.3f} on average (at most {max(errors, key=abs):+.3f})")
        count = f"{len(found)} real cooldown{'s' if len(found) != 1 else ''}"
        text += f" At the ends of the {count}, the scores were off the cooldown's loss by: {'; '.join(misses)}."
    if stable_end is not None and records[-1]["step"] > stable_end:
        last_stable = max((r for r in records if r["step"] <= stable_end), key=lambda r: r["step"], default=None)
        end = records[-1]
        if last_stable is not None:
            text += (f" The run's own decay ended at {end['raw_val_loss']:.4f} (step {end['step']}), "
                     f"{last_stable['raw_val_loss'] - end['raw_val_loss']:.3f} below raw at the stable phase's end "
                     f"(step {last_stable['step']})")
            if forecast is not None and f"{forecast}_val_loss" in last_stable:
                text += f" and {last_stable[f'{forecast}_val_loss'] - end['raw_val_loss']:.3f} below {forecast} there"
            text += "."
    return text.strip()


def mean_abs(values: list[float]) -> float:
    return sum(abs(v) for v in values) / len(values)


def end_of_run(records: list[dict[str, Any]], cooldowns: list[Cooldown], forecast: Optional[str],
               stable_phase: Optional[tuple[int, int]]) -> str:
    """The text the trainer prints at the end of a run (and again once its cooldowns have run)."""
    every = max(1, math.ceil(len(records) / MOST_ROWS))
    which = "every scored step" if every == 1 else f"one in {every} of {len(records)} scored steps, and the last"
    text = f"raw vs the merges, validation loss ({which}; eval.jsonl has them all):\n" + eval_table(records, forecast)
    found = forecasts(records, cooldowns)
    if found:
        text += ("\n\nthe merges vs real cooldowns at the same compute (each merge's score where the cooldown ends, "
                 "minus the cooldown's loss):\n" + forecast_table(found, forecast))
    scored = {r["step"] for r in records}
    for cd in cooldowns:
        if cd.final is not None and cd.branch.end_step not in scored:
            text += (f"\nno forecast for the cooldown from step {cd.branch.step}: the sidecar did not score step "
                     f"{cd.branch.end_step} (its slot left the ring first; sidecar/rank0.log says why)")
    return text + "\n\n" + verdict(records, found, forecast, stable_phase)
