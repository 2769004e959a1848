"""Mixtures from the command line: the sources' entropy-driven weights without training, and the
BiMix law fitted to proxy runs to predict (or choose) a mixture.

    python -m launcher.mixture weights --job JOB [overrides]
        prepares data.dir if it is not (tokenizing only), then prints each source's train tokens,
        conditional entropy and its weight under the natural, uniform and entropy mixtures
    python -m launcher.mixture fit RUN_DIR RUN_DIR ... [--predict a=0.3,b=0.7] [--tokens N] [--optimize]
        fits BiMix (launcher/bimix.py) to the per-source held-out losses in the runs' metrics.jsonl
        (runs of different mixtures on one data dir), reports its fit error in-sample and on each
        share left out, and predicts a proposed mixture's per-source losses after N tokens (default: the
        runs' largest), or the mixture the law says is best (--optimize)

Exit status: 0, or 2 with one line on a bad job, run directory or argument.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from core.config import ConfigError
from core.files import read_jsonl
from core.run_dir import RunDir
from launcher import bimix
from launcher.data.mixture import entropy_weights, mixture_weights


def weights_table(job) -> str:
    from launcher.data import ensure_prepared

    manifest = ensure_prepared(job.data, True, lambda: None)
    names = job.data.source_names()
    sources = manifest["sources"]
    every = [1.0] * len(sources)
    natural = mixture_weights("natural", every, manifest)
    uniform = mixture_weights("weights", every, manifest)
    entropy = entropy_weights([s["conditional_entropy"] for s in sources])
    mine = mixture_weights(job.data.mixture, [s.weight for s in job.data.sources], manifest)
    lines = [f"data.dir {job.data.dir}: {len(sources)} sources, vocab {manifest['vocab_size']}; conditional entropy "
             f"H(x_t+1 | x_t) of each train split in nats, BiMix weights = softmax(H)", "",
             f"| source | train tokens | entropy (nats) | natural | uniform | entropy | this job ({job.data.mixture}) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for i, s in enumerate(sources):
        lines.append(f"| {names[i]} | {s['train_tokens']:,} | {s['conditional_entropy']:.4f} | {natural[i]:.4f} | "
                     f"{uniform[i]:.4f} | {entropy[i]:.4f} | {mine[i]:.4f} |")
    return "\n".join(lines)


def run_mixture(run_dir: str) -> tuple[dict, list[dict]]:
    """The mixture a run sampled (its last `mixture` event) and all its metrics.jsonl records."""
    records = read_jsonl(RunDir(run_dir).metrics)
    if not records:
        raise ValueError(f"{run_dir}: no {RunDir(run_dir).metrics}")
    mixture = next((r for r in reversed(records) if r.get("event") == "mixture"), None)
    if mixture is None:
        raise ValueError(f"{run_dir}: its metrics.jsonl has no mixture record (a run on one source has no mixture)")
    return mixture, records


def run_points(run_dir: str, min_step: int) -> list[bimix.Point]:
    """(share, tokens, loss) of every source in the mixture at each of the run's validations."""
    mixture, records = run_mixture(run_dir)
    by_step = {r["step"]: r for r in records if "val_loss_by_source" in r and r["step"] >= max(min_step, 1)}
    points = [bimix.Point(run_dir, source, mixture["weights"][source], r["tokens"], loss)
              for r in by_step.values() for source, loss in r["val_loss_by_source"].items()
              if mixture["weights"].get(source, 0) > 0]
    if not points:
        raise ValueError(f"{run_dir}: no per-source validation past step {min_step} in its metrics.jsonl")
    return points


def parse_shares(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise ValueError(f"--predict {text!r}: expected name=share,name=share,...") from None


def fit_report(run_dirs: list[str], min_step: int, predict: Optional[str], tokens: Optional[float],
               optimize: bool) -> dict:
    points = [p for d in run_dirs for p in run_points(d, min_step)]
    by_source = bimix.by_source(points)
    laws = {name: bimix.fit(pts) for name, pts in by_source.items()}
    horizon = tokens or max(p.tokens for p in points)
    out: dict = {"runs": run_dirs, "min_step": min_step, "tokens_unit": bimix.TOKENS_UNIT, "sources": {}}
    for name, law in laws.items():
        errors = bimix.relative_errors(law, by_source[name])
        out["sources"][name] = {"law": law.__dict__, "points": len(by_source[name]),
                                "mean_relative_error": float(errors.mean()), "max_relative_error": float(errors.max()),
                                "r2_log": bimix.r_squared_log(law, by_source[name])}
    out["left_out"] = [{**h.__dict__, "relative_error": h.relative_error} for h in bimix.leave_one_share_out(by_source)]
    if predict:
        shares = parse_shares(predict)
        losses = bimix.predict(laws, shares, horizon)
        out["prediction"] = {"shares": shares, "tokens": horizon, "losses": losses,
                             "mean": sum(losses.values()) / len(losses)}
    if optimize:
        best = bimix.optimal_shares(laws, horizon)
        losses = bimix.predict(laws, best, horizon)
        out["optimal"] = {"shares": best, "tokens": horizon, "losses": losses, "mean": sum(losses.values()) / len(losses)}
    return out


def format_fit(out: dict) -> str:
    lines = [f"BiMix L_i = r_i^-alpha (B s^-beta + C), s in {out['tokens_unit']:.0e} tokens, fitted per source on "
             f"{len(out['runs'])} runs", "",
             "| source | points | alpha | B | beta | C | mean rel. error | max rel. error | R² (log) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in out["sources"].items():
        law = s["law"]
        lines.append(f"| {name} | {s['points']} | {law['alpha']:.4f} | {law['B']:.4f} | {law['beta']:.4f} | "
                     f"{law['C']:.4f} | {s['mean_relative_error']:.2%} | {s['max_relative_error']:.2%} | "
                     f"{s['r2_log']:.4f} |")
    if out["left_out"]:
        lines += ["", "Each source's final loss at each share, predicted by the law fitted without that share "
                      "(every run at it left out):", "",
                  "| source | share left out | tokens | predicted | measured | rel. error |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {h['source']} | {h['share']:.4f} | {h['tokens']:,.0f} | {h['predicted']:.4f} | "
                  f"{h['measured']:.4f} | {h['relative_error']:.2%} |" for h in out["left_out"]]
    for key, title in (("prediction", "proposed mixture"), ("optimal", "the law's best mixture")):
        if key in out:
            p = out[key]
            lines += ["", f"{title} after {p['tokens']:,.0f} tokens: "
                      + ", ".join(f"{n} {p['shares'][n]:.3f} → {loss:.4f}" for n, loss in p["losses"].items())
                      + f"; mean {p['mean']:.4f}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.mixture", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("weights", help="each source's conditional entropy and mixture weights")
    w.add_argument("--job", default=None)
    w.add_argument("overrides", nargs="*")
    f = sub.add_parser("fit", help="fit BiMix to proxy runs; predict or choose a mixture")
    f.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    f.add_argument("--predict", default=None, help="a proposed mixture: name=share,name=share,...")
    f.add_argument("--tokens", type=float, default=None, help="predict after this many tokens (default: the runs' most)")
    f.add_argument("--optimize", action="store_true", help="the mixture minimising the sum of predicted losses")
    f.add_argument("--min-step", type=int, default=1, help="leave out validations before this step (warmup)")
    f.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        if args.command == "weights":
            from launcher.config import load_job

            print(weights_table(load_job(args.job, args.overrides)))
            return 0
        out = fit_report(args.run_dirs, args.min_step, args.predict, args.tokens, args.optimize)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_fit(out))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
