"""A report a person can look at: validation loss of raw, LAWA, EMA and SWA weights against steps
and tokens, the learning rate beneath, and what averaging saves.

    python -m launcher.report runs/lawa_lr_cpu runs/lawa_lr_cpu_10x --out docs/results/lawa_lr_cpu

Reads each run directory's `eval.jsonl` (the sidecar's scores, all on one held-out set),
`metrics.jsonl` (learning rate, throughput) and `sidecar/spec.json` (layout); writes
`report.png` (one column per run, or `--overlay` for one set of axes) and `report.md`: each
method's best and final loss, and the steps, tokens and device-hours its averaged model saves to
reach the raw model's final loss (the LAWA paper's headline metric), at the resolution of the
sidecar's evaluations.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Optional

from averaging.ema_swa import KINDS
from averaging.sidecar.protocol import SidecarSpec, read_eval_log
from core.config import ConfigError
from core.files import read_jsonl
from core.run_dir import RunDir
from launcher.config import load_job

METHODS = ("raw", "lawa", *KINDS)
LABELS = {"raw": "raw", "lawa": "LAWA", "ema": "EMA", "swa": "SWA"}
COLORS = {"raw": "black", "lawa": "tab:blue", "ema": "tab:orange", "swa": "tab:green"}
RUN_STYLES = ("-", "--", ":", "-.")
GAP_FRACTIONS = (0.25, 0.5, 0.75)


@dataclass
class Run:
    name: str
    path: str
    evals: list[dict[str, Any]]
    lrs: list[tuple[int, float]]  # (step, lr) at logging steps
    peak_lr: Optional[float]
    seconds_per_step: Optional[float]  # median over logging windows: compute only
    devices: int
    device_kind: str
    token_offset: int = 0  # tokens seen before step 0: those of the run it was grown from


    def methods(self) -> list[str]:
        return [m for m in METHODS if any(f"{m}_val_loss" in r for r in self.evals)]

    def series(self, method: str, x: str = "step") -> tuple[list[float], list[float]]:
        shift = self.token_offset if x == "tokens" else 0
        points = [(r[x] + shift, r[f"{method}_val_loss"]) for r in self.evals if f"{method}_val_loss" in r]
        return [p[0] for p in points], [p[1] for p in points]


def schedule_of(path: str) -> list[tuple[int, float]]:
    """Every step's learning rate, recomputed from the run's resolved config (the schedule is a
    pure function of the step); empty when the config cannot be read."""
    config = RunDir(path).config
    if not os.path.isfile(config):
        return []
    try:
        job = load_job(config)
    except ConfigError:
        return []
    return [(step + 1, job.learning_rate(step)) for step in range(job.train.steps)]


def load_run(path: str) -> Run:
    evals = read_eval_log(path)
    if not evals:
        raise ValueError(f"{path} has no {RunDir(path).eval_log} records: was it run with the sidecar "
                         f"(sidecar.enabled=true), or scored with `torchrun ... -m averaging.sidecar --run-dir {path}`?")
    metrics = read_jsonl(RunDir(path).metrics)
    steps = [r for r in metrics if "lr" in r]
    lrs = schedule_of(path) or sorted({r["step"]: r["lr"] for r in steps}.items())
    per_step = [(r["tokens"] / r["step"]) / r["tokens_per_s"] for r in steps if r.get("tokens_per_s") and r["step"]]
    spec = SidecarSpec.read(path) if SidecarSpec.exists(path) else None
    grown = [r for r in metrics if r.get("event") == "growth"]
    return Run(name=os.path.basename(os.path.normpath(path)), path=path, evals=evals, lrs=lrs,
               peak_lr=max((lr for _, lr in lrs), default=None),
               seconds_per_step=statistics.median(per_step) if per_step else None,
               devices=spec.dp * spec.tp if spec else 1, device_kind=spec.training_device if spec else "device",
               token_offset=(grown[-1].get("source_tokens") or 0) if grown else 0)


# ---------------------------------------------------------------------------------------------
# the table


def savings(run: Run, method: str) -> dict[str, Any]:
    """Best and final loss of a method, and what its averaged model saves to reach raw's final loss."""
    raw_final = run.evals[-1]["raw_val_loss"]
    final = run.evals[-1]
    records = [r for r in run.evals if f"{method}_val_loss" in r]
    best = min(records, key=lambda r: r[f"{method}_val_loss"])
    reached = next((r for r in records if r[f"{method}_val_loss"] <= raw_final), None)
    out = {"best": best[f"{method}_val_loss"], "best_step": best["step"],
           "final": records[-1][f"{method}_val_loss"] if records[-1] is final else None, "reached_step": None,
           "gaps": {}}
    for fraction in GAP_FRACTIONS:  # averaging gains most early and mid-run; the final step hides it
        near = min(run.evals, key=lambda r: abs(r["step"] - fraction * final["step"]))
        if f"{method}_val_loss" in near:
            out["gaps"][fraction] = (near["step"], near[f"{method}_val_loss"] - near["raw_val_loss"])
    if reached is not None:
        steps = final["step"] - reached["step"]
        out.update(reached_step=reached["step"], steps_saved=steps, fraction_saved=steps / final["step"],
                   tokens_saved=final["tokens"] - reached["tokens"])
        if run.seconds_per_step is not None:
            out["device_hours_saved"] = steps * run.seconds_per_step * run.devices / 3600
    return out


def _tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def markdown(runs: list[Run]) -> str:
    lines = []
    for run in runs:
        final = run.evals[-1]
        lr = f", peak LR {run.peak_lr:.2e}" if run.peak_lr is not None else ""
        grown = f" (+ {_tokens(run.token_offset)} in the run it was grown from)" if run.token_offset else ""
        lines += [f"### {run.name}", "",
                  f"{final['step']} steps, {_tokens(final['tokens'])} tokens{grown}{lr}; {len(run.evals)} evaluations "
                  f"on the same held-out set. Raw model's final loss: **{final['raw_val_loss']:.4f}**.", "",
                  f"| method | best val loss (step) | final val loss | first step at or below raw's final | "
                  f"steps saved | tokens saved | {run.device_kind}-hours saved | "
                  + " | ".join(f"− raw at {f:.0%}" for f in GAP_FRACTIONS) + " |",
                  "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(GAP_FRACTIONS)]
        for method in run.methods():
            s = savings(run, method)
            final_text = "n/a" if s["final"] is None else f"{s['final']:.4f}"
            if s["reached_step"] is None:
                saved = ["not reached", "–", "–", "–"]
            else:
                hours = f"{s['device_hours_saved']:.3f}" if "device_hours_saved" in s else "n/a"
                saved = [str(s["reached_step"]), f"{s['steps_saved']} ({s['fraction_saved']:.0%})",
                         _tokens(s["tokens_saved"]), hours]
            gaps = [f"{s['gaps'][f][1]:+.4f} ({s['gaps'][f][0]})" if f in s["gaps"] else "–" for f in GAP_FRACTIONS]
            lines.append(f"| {LABELS[method]} | {s['best']:.4f} ({s['best_step']}) | {final_text} | "
                         + " | ".join(saved + gaps) + " |")
        lines.append("")
    lines.append("Device-hours: steps saved × the run's median compute time per step (from metrics.jsonl) × its "
                 "training ranks. The sidecar scores every snapshot it sees, so savings are resolved to that spacing. "
                 "\"− raw at x%\": the method's loss minus the raw model's at the evaluation nearest that point "
                 "of the run (negative: the average is better).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# the figure


def _y_range(runs: list[Run]) -> tuple[float, float]:
    """Leave the first 10% of each run out of the range: its losses dwarf the differences that matter."""
    values = []
    for run in runs:
        last = run.evals[-1]["step"]
        for r in run.evals:
            if r["step"] >= 0.1 * last:
                values += [r[f"{m}_val_loss"] for m in METHODS if f"{m}_val_loss" in r]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def figure(runs: list[Run], out_png: str, overlay: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 if overlay else len(runs)
    fig, axes = plt.subplots(3, columns, figsize=(6.2 * columns, 10), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 3, 1.4]})
    y_range = _y_range(runs)
    for i, run in enumerate(runs):
        col = 0 if overlay else i
        style = RUN_STYLES[i % len(RUN_STYLES)] if overlay else "-"
        suffix = f" ({run.name})" if overlay else ""
        for method in run.methods():
            for row, x in ((0, "step"), (1, "tokens")):
                xs, ys = run.series(method, x)
                axes[row][col].plot(xs, ys, style, color=COLORS[method], label=LABELS[method] + suffix,
                                    lw=1.8 if method != "raw" else 1.3, marker="." if len(xs) < 40 else None)
        if run.lrs:
            axes[2][col].plot([s for s, _ in run.lrs], [lr for _, lr in run.lrs], style, color="tab:red",
                              label=f"LR{suffix}")
    for col in range(columns):
        title = "all runs" if overlay else runs[col].name
        axes[0][col].set_title(f"{title}: validation loss")
        axes[0][col].set_xlabel("step")
        grown = any(r.token_offset for r in (runs if overlay else [runs[col]]))
        axes[1][col].set_xlabel("tokens (a grown run's include its source run's)" if grown else "tokens")
        axes[2][col].set_xlabel("step")
        axes[2][col].set_ylabel("learning rate")
        for row in (0, 1):
            axes[row][col].set_ylabel("validation loss")
            axes[row][col].set_ylim(*y_range)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
        axes[2][col].grid(alpha=0.3)
        axes[2][col].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if overlay:
            axes[2][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def default_out(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report")
    return os.path.join("reports", "_vs_".join(os.path.basename(os.path.normpath(d)) for d in run_dirs))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", default=None, help="folder for report.png and report.md (default: RUN_DIR/report "
                                                    "for one run, reports/<a>_vs_<b> for several)")
    parser.add_argument("--overlay", action="store_true", help="all runs on one set of axes")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.run_dirs]
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or default_out(args.run_dirs)
    os.makedirs(out, exist_ok=True)
    figure(runs, os.path.join(out, "report.png"), args.overlay)
    text = markdown(runs)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# Raw vs LAWA vs EMA vs SWA\n\n![validation loss and learning rate](report.png)\n\n" + text)
    print(text)
    print(f"wrote {os.path.join(out, 'report.png')} and {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
