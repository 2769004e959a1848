"""Natural vs uniform vs entropy-driven (BiMix) mixtures of prose, code and arithmetic, at the same
token budget and two seeds (jobs/mixtures_cpu.yaml), scored per source on the same held-out windows;
then BiMix's law fitted to those six runs, each mixture predicted with its own runs left out, and the
mixture the law calls best trained too and set beside its prediction.

    python bench/mixtures_cpu.py --out docs/results/mixtures_cpu        # about 30 minutes on 2 cores

A finished run (its run dir holds the last validation) is not run again: the script can be resumed.
Writes OUT/results.md (every table), OUT/losses.png (a panel per source) and OUT/fit.json (the
law, its errors and predictions).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from common import REPO, machine_info, run_logged, torchrun_cmd

JOB = "jobs/mixtures_cpu.yaml"
MIXTURES = {"natural": ["data.mixture=natural"], "uniform": ["data.mixture=weights"],
            "entropy": ["data.mixture=entropy"]}


def last_validation(run_dir: Path) -> dict | None:
    from core.files import read_jsonl

    records = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "val_loss_by_source" in r]
    return records[-1] if records else None


def shown(path: Path) -> str:
    return os.path.relpath(path, REPO)


def train(name: str, extra: list[str], steps: int, runs: Path, logs: Path, commands: list[str]) -> Path:
    run_dir = runs / name
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "launcher/train.py", "--job", JOB,
           f"run_dir={shown(run_dir)}", *extra]
    done = last_validation(run_dir)
    if done is not None and done["step"] == steps:
        commands.append(shlex.join(cmd))
        print(f"  {name}: done before, kept", flush=True)
        return run_dir
    wall = run_logged(torchrun_cmd(*cmd[4:]), logs / f"{name}.log", [])
    commands.append(shlex.join(cmd))
    print(f"  {name}: {wall:.0f} s", flush=True)
    return run_dir


def mixture_of(run_dir: Path) -> dict[str, float]:
    from launcher.mixture import run_mixture

    return run_mixture(str(run_dir))[0]["weights"]


def table(groups: dict[str, list[Path]], sources: list[str]) -> list[str]:
    """Final held-out loss per source and its mean over sources, per run and per mixture (seeds' mean)."""
    lines = ["| mixture | seed | " + " | ".join(f"{s} share" for s in sources) + " | " + " | ".join(sources)
             + " | mean of sources | the mixture's own val_loss |",
             "|---|---|" + "---:|" * (2 * len(sources) + 2)]
    means = {}
    for mixture, run_dirs in groups.items():
        rows = []
        for run_dir in run_dirs:
            final, shares = last_validation(run_dir), mixture_of(run_dir)
            by = final["val_loss_by_source"]
            rows.append([by[s] for s in sources] + [statistics.mean(by[s] for s in sources), final["val_loss"]])
            seed = run_dir.name.rsplit("_s", 1)[1]
            lines.append(f"| {mixture} | {seed} | " + " | ".join(f"{shares[s]:.3f}" for s in sources) + " | "
                         + " | ".join(f"{v:.4f}" for v in rows[-1]) + " |")
        means[mixture] = [statistics.mean(col) for col in zip(*rows)]
        lines.append(f"| **{mixture}** | mean | " + " | ".join("" for _ in sources) + " | "
                     + " | ".join(f"**{v:.4f}**" for v in means[mixture]) + " |")
    return lines, means


def figure(groups: dict[str, list[Path]], sources: list[str], out_png: Path) -> None:
    """A panel per source and one for their mean: held-out loss against tokens, each mixture the
    mean of its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.files import read_jsonl

    fig, axes = plt.subplots(1, len(sources) + 1, figsize=(4.6 * (len(sources) + 1), 4.0), squeeze=False)
    for mixture, run_dirs in groups.items():
        curves = [{r["tokens"]: r["val_loss_by_source"] for r in read_jsonl(str(d / "metrics.jsonl"))
                   if "val_loss_by_source" in r} for d in run_dirs]
        tokens = sorted(set.intersection(*(set(c) for c in curves)))
        for col, source in enumerate([*sources, "mean of sources"]):
            picked = [{t: statistics.mean(c[t][s] for s in sources) if source == "mean of sources" else c[t][source]
                       for t in tokens} for c in curves]
            axes[0][col].plot([t / 1e3 for t in tokens], [statistics.mean(p[t] for p in picked) for t in tokens], marker=".",
                              label=mixture, lw=1.5)
    for col, source in enumerate([*sources, "mean of sources"]):
        ax = axes[0][col]
        ax.set_title(f"{source}: held-out loss")
        ax.set_xlabel("thousand tokens trained")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        low = min(line.get_ydata()[-1] for line in ax.get_lines())
        ax.set_ylim(low - 0.15, low + 1.0)  # the first evaluations are far above: keep the end readable
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/mixtures_cpu")
    parser.add_argument("--runs", default="runs", help="where the run directories go")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--no-optimum", action="store_true", help="do not train the law's best mixture")
    args = parser.parse_args()
    out, runs = Path(args.out), Path(args.runs).resolve()
    logs = runs / "mixtures_cpu_logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    commands: list[str] = []
    common = [f"train.steps={args.steps}"]

    groups: dict[str, list[Path]] = {}
    for mixture, extra in MIXTURES.items():
        for seed in seeds:
            groups.setdefault(mixture, []).append(
                train(f"mixtures_cpu_{mixture}_s{seed}", [*extra, *common, f"train.seed={seed}"], args.steps, runs,
                      logs, commands))
    proxies = [shown(d) for ds in groups.values() for d in ds]
    fit_json = out / "fit.json"
    fit_cmd = ["python", "-m", "launcher.mixture", "fit", *proxies, "--optimize", "--min-step", "100",
               "--json", shown(fit_json.resolve())]
    run_logged([sys.executable, *fit_cmd[1:]], logs / "fit.log", [])
    commands.append(shlex.join(fit_cmd))
    fit = json.loads(fit_json.read_text())
    sources = list(fit["sources"])

    if not args.no_optimum:
        best = fit["optimal"]["shares"]
        shares = ", ".join(f'{{path: "{p}", name: {n}, weight: {best[n]:.4f}}}' for n, p in
                           zip(sources, ("builtin:pydoc", "builtin:stdlib", "builtin:arithmetic")))
        for seed in seeds:
            groups.setdefault("BiMix optimum", []).append(
                train(f"mixtures_cpu_optimum_s{seed}", [f"data.sources=[{shares}]", "data.mixture=weights", *common,
                                                         f"train.seed={seed}"], args.steps, runs, logs, commands))

    figure(groups, sources, out / "losses.png")
    lines, means = table(groups, sources)
    proxies_only = {m: v for m, v in means.items() if m in MIXTURES}
    winner = min(proxies_only, key=lambda m: proxies_only[m][len(sources)])
    machine = machine_info()
    text = [f"# Mixtures at CPU scale: results ({datetime.date.today()}; {machine.get('cpu', 'cpu')}, "
            f"torch {machine.get('torch', '?')})",
            "", f"Final held-out loss (step {args.steps}) per source, each on its own fixed held-out windows (the same "
            "for every run); \"mean of sources\" weighs the sources equally (BiMix's average loss), the last column "
            "weighs them by the run's own mixture.", "", "![held-out loss per source](losses.png)", "", *lines, "",
            f"Lowest mean of sources among the three proxy mixtures: **{winner}**.", ""]
    left = fit["left_out"]
    text += ["BiMix fitted on the proxy runs (validations from step 100 on); each share predicted with every run at "
             "it left out:", "", "| source | share | predicted | measured (mean of seeds) | rel. error |",
             "|---|---:|---:|---:|---:|"]
    text += [f"| {h['source']} | {h['share']:.4f} | {h['predicted']:.4f} | {h['measured']:.4f} | "
             f"{h['relative_error']:.2%} |" for h in left]
    text += ["", "| source | alpha | B | beta | C | in-sample mean rel. error | R² (log) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in fit["sources"].items():
        law = s["law"]
        text.append(f"| {name} | {law['alpha']:.4f} | {law['B']:.4f} | {law['beta']:.4f} | {law['C']:.4f} | "
                    f"{s['mean_relative_error']:.2%} | {s['r2_log']:.4f} |")
    if "BiMix optimum" in means:
        predicted = fit["optimal"]["losses"]
        measured = dict(zip(sources, means["BiMix optimum"]))
        text += ["", "The law's best mixture (minimum of the summed predicted losses), trained: "
                 + ", ".join(f"{n} {fit['optimal']['shares'][n]:.3f}" for n in sources), "",
                 "| source | predicted | measured (mean of seeds) | rel. error |", "|---|---:|---:|---:|"]
        text += [f"| {n} | {predicted[n]:.4f} | {measured[n]:.4f} | {abs(predicted[n] - measured[n]) / measured[n]:.2%} |"
                 for n in sources]
        text += [f"| mean | {fit['optimal']['mean']:.4f} | {statistics.mean(measured.values()):.4f} | |"]
    text += ["", "Commands (from the repository root, with `OMP_NUM_THREADS=1`; or all of it: "
             f"`python bench/mixtures_cpu.py --out {shown(out.resolve())}`):", "", "```", *commands, "```", ""]
    (out / "results.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
