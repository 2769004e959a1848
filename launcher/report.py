"""A report a person can look at: validation loss of the raw weights, of every merge the sidecar
scored (LAWA and the schedule-derived merges of `lawa.merges`), EMA and SWA, against steps and
tokens, each method minus raw, the learning rate beneath, and what averaging saves; with a run's
cooldown branches (launcher/cooldown.py) beside the merges at their branch points.

    python -m launcher.report runs/lawa_lr_cpu runs/lawa_lr_cpu_10x --out docs/results/lawa_lr_cpu

Reads each run directory's `eval.jsonl` (the sidecar's scores, all on one held-out set),
`metrics.jsonl` (learning rate, throughput) and `sidecar/spec.json` (layout); writes
`report.png` (one column per run, or `--overlay` for one set of axes), for a run on several sources
`sources.png` (a panel per source, every method in it), and `report.md`: each
method's best and final loss, and the steps, tokens and device-hours its averaged model saves to
reach the raw model's final loss (the LAWA paper's headline metric), at the resolution of the
sidecar's evaluations; for each cooldown branch, the cooldown's loss beside every method at the
branch point (no extra compute) and at the branch's end (the same compute); and, for several runs,
each method minus raw across them (the noise between seeds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from averaging.sidecar.protocol import SidecarSpec, merge_names, read_eval_log, scored_methods
from core.config import ConfigError
from core.files import read_jsonl, write_file_atomic
from core.run_dir import RunDir
from launcher.config import load_job
from launcher.forecast import Cooldown, cooldowns_of, end_of_run, forecast_table, forecasts, verdict

NAMED = {"raw": ("raw", "black"), "lawa": ("LAWA", "tab:blue"), "ema": ("EMA", "tab:orange"),
         "swa": ("SWA", "tab:green")}
MERGE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
COOLDOWN_COLOR = "tab:red"
RUN_STYLES = ("-", "--", ":", "-.")
GAP_FRACTIONS = (0.25, 0.5, 0.75)


def label(method: str) -> str:
    return NAMED.get(method, (method, None))[0]


def color(method: str, methods: list[str]) -> str:
    if method in NAMED:
        return NAMED[method][1]
    others = [m for m in methods if m not in NAMED]
    return MERGE_COLORS[others.index(method) % len(MERGE_COLORS)]


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
    cooldowns: list[Cooldown] = field(default_factory=list)
    forecast: Optional[str] = None  # the merge whose score forecasts a cooldown (eval.jsonl's "forecast")
    stable_phase: Optional[tuple[int, int]] = None  # (warmup's last step, the last at the peak learning rate)

    def methods(self) -> list[str]:
        return scored_methods(self.evals)

    def at_step(self, step: int) -> Optional[dict[str, Any]]:
        return next((r for r in self.evals if r["step"] == step), None)

    def series(self, method: str, x: str = "step") -> tuple[list[float], list[float]]:
        shift = self.token_offset if x == "tokens" else 0
        points = [(r[x] + shift, r[f"{method}_val_loss"]) for r in self.evals if f"{method}_val_loss" in r]
        return [p[0] for p in points], [p[1] for p in points]


def job_of(path: str) -> Optional[Any]:
    """The run's resolved job, or None when its config cannot be read."""
    config = RunDir(path).config
    if not os.path.isfile(config):
        return None
    try:
        return load_job(config)
    except ConfigError:
        return None


def schedule_of(job) -> list[tuple[int, float]]:
    """Every step's learning rate, recomputed from the run's job (the schedule is a pure function
    of the step); empty without one."""
    return [] if job is None else [(step + 1, job.learning_rate(step)) for step in range(job.train.steps)]


def load_run(path: str) -> Run:
    evals = read_eval_log(path)
    if not evals:
        raise ValueError(f"{path} has no {RunDir(path).eval_log} records: was it run with the sidecar "
                         f"(sidecar.enabled=true), or scored with `torchrun ... -m averaging.sidecar --run-dir {path}`?")
    metrics = read_jsonl(RunDir(path).metrics)
    steps = [r for r in metrics if "lr" in r]
    job = job_of(path)
    lrs = schedule_of(job) or sorted({r["step"]: r["lr"] for r in steps}.items())
    per_step = [(r["tokens"] / r["step"]) / r["tokens_per_s"] for r in steps if r.get("tokens_per_s") and r["step"]]
    spec = SidecarSpec.read(path) if SidecarSpec.exists(path) else None
    grown = [r for r in metrics if r.get("event") == "growth"]
    return Run(cooldowns=cooldowns_of(path), forecast=next((r["forecast"] for r in evals[::-1] if "forecast" in r), None),
               stable_phase=job.stable_phase if job is not None else None, name=os.path.basename(os.path.normpath(path)), path=path, evals=evals, lrs=lrs,
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
            lines.append(f"| {label(method)} | {s['best']:.4f} ({s['best_step']}) | {final_text} | "
                         + " | ".join(saved + gaps) + " |")
        lines.append("")
        lines += cooldown_tables(run)
        lines += task_table(run)
    if len(runs) > 1:
        lines += across_runs(runs)
    lines.append("Device-hours: steps saved × the run's median compute time per step (from metrics.jsonl) × its "
                 "training ranks. The sidecar scores every snapshot it sees, so savings are resolved to that spacing. "
                 "\"− raw at x%\": the method's loss minus the raw model's at the evaluation nearest that point "
                 "of the run (negative: the average is better).")
    return "\n".join(lines) + "\n"


def _loss(record: Optional[dict[str, Any]], method: str) -> str:
    value = record.get(f"{method}_val_loss") if record else None
    return "–" if value is None else f"{value:.4f}"


def cooldown_tables(run: Run) -> list[str]:
    """Per branch point: every method at the branch step (no extra compute) and at the cooldown's
    end (the parent kept training at its peak LR for the same steps: the same compute), beside the
    cooldown's own loss."""
    if not run.cooldowns:
        return []
    methods = run.methods()
    lines = [f"#### {run.name}: merges vs a real cooldown", "",
             "| branch | at step | extra compute | " + " | ".join(label(m) for m in methods) + " | cooldown |",
             "|---|---:|---|" + "---:|" * (len(methods) + 1)]
    for cd in run.cooldowns:
        b = cd.branch
        final = "not finished" if cd.final is None else f"**{cd.final:.4f}**"
        name = f"{b.shape}, {b.cooldown_steps} steps from {b.step}"
        lines.append(f"| {name} | {b.step} | none | " + " | ".join(_loss(run.at_step(b.step), m) for m in methods)
                     + " | – |")
        lines.append(f"| {name} | {b.end_step} | +{b.cooldown_steps} steps ({_tokens(b.extra_tokens)} tokens), "
                     f"both | " + " | ".join(_loss(run.at_step(b.end_step), m) for m in methods) + f" | {final} |")
    lines += ["", "At the branch step the merges cost nothing beyond the training already done; at the branch's end "
              "the parent has trained the same extra steps at its peak learning rate that the cooldown spent "
              "decaying it, on the same batches. \"–\": not scored at that step.", ""]
    found = forecasts(run.evals, run.cooldowns)
    if found:
        lines += [f"#### {run.name}: forecast errors (each merge at the cooldown's end minus the cooldown)", "",
                  forecast_table(found, run.forecast), "", verdict(run.evals, found, run.forecast, run.stable_phase), ""]
    return lines


def task_table(run: Run) -> list[str]:
    """The evaluation tasks' metrics (lm-evaluation-harness) per method at the newest step they were
    scored, and at the first, so that a user sees what the merges change downstream."""
    scored = [r for r in run.evals if r.get("tasks")]
    if not scored:
        return []
    methods = [m for m in run.methods() if m in scored[-1]["tasks"]]
    lines = [f"#### {run.name}: evaluation tasks", "",
             "| step | task | metric | " + " | ".join(label(m) for m in methods) + " |",
             "|---:|---|---|" + "---:|" * len(methods)]
    for record in ([scored[0]] if len(scored) > 1 else []) + [scored[-1]]:
        tasks = record["tasks"]
        for task, metrics in tasks["raw"].items():
            for metric in (m for m in metrics if m != "n"):
                values = [tasks.get(m, {}).get(task, {}).get(metric) for m in methods]
                lines.append(f"| {record['step']} | {task} | {metric} | "
                             + " | ".join("–" if v is None else f"{v:.4f}" for v in values) + " |")
    return lines + ["", f"Scored by the sidecar through lm-evaluation-harness ({len(scored)} of {len(run.evals)} "
                        "evaluations); `python -m averaging.lm_eval FOLDER --tasks ...` scores any slot the same way.", ""]


def across_runs(runs: list[Run]) -> list[str]:
    """Each method minus raw at every run's final step, and each cooldown minus the parent's raw at
    its end: the spread between runs (seeds) is the noise the differences must clear."""
    methods: list[str] = []
    for run in runs:
        methods += [m for m in run.methods()[1:] if m not in methods]
    lines = ["### Across runs: minus raw at the final step (negative: better than raw)", "",
             "| run | raw | " + " | ".join(f"{label(m)} − raw" for m in methods)
             + " | each cooldown at its end: − raw / − the first merge, same step |",
             "|---|---:|" + "---:|" * (len(methods) + 1)]
    for run in runs:
        final = run.evals[-1]
        cells = [f"{final[f'{m}_val_loss'] - final['raw_val_loss']:+.4f}" if f"{m}_val_loss" in final else "–"
                 for m in methods]
        cds = []
        for cd in run.cooldowns:
            end = run.at_step(cd.branch.end_step)
            head = merge_names(end)[0] if end is not None else None
            if cd.final is not None and end is not None:
                vs_merge = f" / {cd.final - end[f'{head}_val_loss']:+.4f}" if head and f"{head}_val_loss" in end else ""
                cds.append(f"{cd.branch.step}→{cd.branch.end_step}: {cd.final - end['raw_val_loss']:+.4f}{vs_merge}")
        lines.append(f"| {run.name} | {final['raw_val_loss']:.4f} | " + " | ".join(cells) + f" | {'; '.join(cds) or '–'} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# the figure


def _y_range(runs: list[Run]) -> tuple[float, float]:
    """Leave the first 10% of each run out of the range: its losses dwarf the differences that matter."""
    values = []
    for run in runs:
        last = run.evals[-1]["step"]
        for r in run.evals:
            if r["step"] >= 0.1 * last:
                values += [r[f"{m}_val_loss"] for m in run.methods() if f"{m}_val_loss" in r]
        values += [loss for cd in run.cooldowns for _, loss in cd.losses]
    low, high = min(values), max(values)
    pad = 0.05 * (high - low or 1.0)
    return low - pad, high + pad


def _gap_range(runs: list[Run]) -> tuple[float, float]:
    """The minus-raw axis over the last three quarters of each run: early on every average lags by
    far more than the few hundredths that decide the comparison (those points run off the top)."""
    values = [0.0]
    for run in runs:
        last = run.evals[-1]["step"]
        values += [r[f"{m}_val_loss"] - r["raw_val_loss"] for r in run.evals if r["step"] >= 0.25 * last
                   for m in run.methods()[1:] if f"{m}_val_loss" in r]
        for cd in run.cooldowns:
            end = run.at_step(cd.branch.end_step)
            if cd.final is not None and end is not None:
                values.append(cd.final - end["raw_val_loss"])
    low, high = min(values), max(values)
    pad = 0.15 * (high - low or 0.01)
    return low - pad, high + pad


def figure(runs: list[Run], out_png: str, overlay: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 if overlay else len(runs)
    fig, axes = plt.subplots(4, columns, figsize=(6.2 * columns, 13), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 3, 2.2, 1.4]})
    y_range, gap_range = _y_range(runs), _gap_range(runs)
    for i, run in enumerate(runs):
        col = 0 if overlay else i
        style = RUN_STYLES[i % len(RUN_STYLES)] if overlay else "-"
        suffix = f" ({run.name})" if overlay else ""
        methods = run.methods()
        for method in methods:
            name = label(method) + (" (forecast)" if method == run.forecast else "") + suffix
            for row, x in ((0, "step"), (1, "tokens")):
                xs, ys = run.series(method, x)
                axes[row][col].plot(xs, ys, style, color=color(method, methods), label=name,
                                    lw=1.8 if method != "raw" else 1.3, marker="." if len(xs) < 40 else None)
            if method != "raw":  # a 0.01-0.04 gain is invisible on the loss axes; here it is the axis
                gaps = [(r["step"], r[f"{method}_val_loss"] - r["raw_val_loss"]) for r in run.evals
                        if f"{method}_val_loss" in r]
                axes[2][col].plot([g[0] for g in gaps], [g[1] for g in gaps], style, color=color(method, methods),
                                  label=name, lw=2.6 if method == run.forecast else 1.5)
        for j, cd in enumerate(run.cooldowns):
            start = run.at_step(cd.branch.step)
            points = ([(cd.branch.step, start["raw_val_loss"])] if start else []) + cd.losses
            axes[0][col].plot([p[0] for p in points], [p[1] for p in points], style, color=COOLDOWN_COLOR, lw=1.2,
                              marker="*" if cd.final is not None else None, markevery=[len(points) - 1],
                              label=("cooldown branches" + suffix) if j == 0 else None)
            end = run.at_step(cd.branch.end_step)
            if cd.final is not None and end is not None:
                axes[2][col].plot([cd.branch.end_step], [cd.final - end["raw_val_loss"]], "*", color=COOLDOWN_COLOR,
                                  ms=9, label=("cooldown (+D steps)" + suffix) if j == 0 else None)
        if run.lrs:
            axes[3][col].plot([s for s, _ in run.lrs], [lr for _, lr in run.lrs], style, color="tab:red",
                              label=f"LR{suffix}")
    for col in range(columns):
        title = "all runs" if overlay else runs[col].name
        axes[0][col].set_title(f"{title}: validation loss")
        axes[0][col].set_xlabel("step")
        grown = any(r.token_offset for r in (runs if overlay else [runs[col]]))
        axes[1][col].set_xlabel("tokens (a grown run's include its source run's)" if grown else "tokens")
        axes[2][col].set_xlabel("step")
        axes[2][col].set_ylabel("minus raw (lower: better); last 3/4")
        axes[2][col].axhline(0.0, color="black", lw=0.8)
        axes[2][col].set_ylim(*gap_range)
        axes[3][col].set_xlabel("step")
        axes[3][col].set_ylabel("learning rate")
        for row in (0, 1):
            axes[row][col].set_ylabel("validation loss")
            axes[row][col].set_ylim(*y_range)
        for row in (0, 1, 2):
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend(fontsize=8)
        axes[3][col].grid(alpha=0.3)
        axes[3][col].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if overlay:
            axes[3][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def sources_of(runs: list[Run]) -> list[str]:
    """The sources scored one by one (val_loss_by_source), in the order the runs list them."""
    names: list[str] = []
    for run in runs:
        for r in run.evals:
            names += [n for n in r.get("val_loss_by_source", {}).get("raw", {}) if n not in names]
    return names


def source_table(runs: list[Run], sources: list[str]) -> list[str]:
    """Each source's held-out loss at each run's final step, per method, and the method minus raw."""
    lines = ["### Per source: held-out loss at the final step (method − raw)", "",
             "| run | method | " + " | ".join(sources) + " |", "|---|---|" + "---:|" * len(sources)]
    for run in runs:
        final = run.evals[-1].get("val_loss_by_source", {})
        for method in run.methods():
            cells = []
            for source in sources:
                value, raw = final.get(method, {}).get(source), final.get("raw", {}).get(source)
                gap = f" ({value - raw:+.4f})" if method != "raw" and value is not None and raw is not None else ""
                cells.append("–" if value is None else f"{value:.4f}{gap}")
            lines.append(f"| {run.name} | {label(method)} | " + " | ".join(cells) + " |")
    return lines + [""]


def source_figure(runs: list[Run], sources: list[str], out_png: str) -> None:
    """A panel per source: every method's held-out loss on that source against steps (runs by line style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sources), figsize=(5.2 * len(sources), 4.2), squeeze=False)
    for col, source in enumerate(sources):
        ax = axes[0][col]
        for i, run in enumerate(runs):
            methods = run.methods()
            for method in methods:
                points = [(r["step"], r["val_loss_by_source"][method][source]) for r in run.evals
                          if source in r.get("val_loss_by_source", {}).get(method, {})]
                if points:
                    suffix = f" ({run.name})" if len(runs) > 1 else ""
                    ax.plot([p[0] for p in points], [p[1] for p in points], RUN_STYLES[i % len(RUN_STYLES)],
                            color=color(method, methods), label=label(method) + suffix, lw=1.5,
                            marker="." if len(points) < 40 else None)
        ax.set_title(f"{source}: held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def default_out(run_dirs: list[str]) -> str:
    if len(run_dirs) == 1:
        return os.path.join(run_dirs[0], "report")
    return os.path.join("reports", "_vs_".join(os.path.basename(os.path.normpath(d)) for d in run_dirs))


def end_of_run_report(run_dir: str) -> str:
    """What a run prints at its end (and again once its scheduled cooldowns have run): the short
    table, the forecast errors and the verdict (launcher/forecast.py); writes RUN_DIR/report/."""
    run = load_run(run_dir)
    text = end_of_run(run.evals, run.cooldowns, run.forecast, run.stable_phase)
    out = default_out([run_dir])
    write_report([run], out)
    return f"{text}\n\nplotted in {os.path.join(out, 'report.png')}, tabulated in {os.path.join(out, 'report.md')}"


def write_report(runs: list[Run], out: str, overlay: bool = False) -> str:
    """report.png (and sources.png for a run on several sources) and report.md into `out`;
    returns the Markdown, with a last line naming what was written."""
    os.makedirs(out, exist_ok=True)
    figure(runs, os.path.join(out, "report.png"), overlay)
    text = markdown(runs)
    sources = sources_of(runs)
    if sources:
        source_figure(runs, sources, os.path.join(out, "sources.png"))
        text += "\n![held-out loss per source](sources.png)\n\n" + "\n".join(source_table(runs, sources))
    write_file_atomic(os.path.join(out, "report.md"), "# Raw vs the merges, EMA and SWA\n\n"
                      "![validation loss and learning rate](report.png)\n\n" + text)
    return text + (f"wrote {os.path.join(out, 'report.png')}{' and sources.png' if sources else ''} and "
                   f"{os.path.join(out, 'report.md')}")


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
    text = write_report(runs, args.out or default_out(args.run_dirs), args.overlay)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
