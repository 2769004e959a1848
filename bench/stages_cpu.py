"""The launcher at each ZeRO stage against a plain PyTorch DDP loop (bench/ddp_peer_worker.py) of
the same model, batches and optimizer, on this machine's CPUs: 2 gloo ranks, fp32, at a 1.3M and a
12M-parameter shape; each stage with snapshots and the sidecar off, then with snapshots every 20
steps and the sidecar on.

Every variant is a real 2-rank torchrun job from the repository root (the launcher's own
launcher/train.py; evaluation and checkpoints only after the last timed window). A figure is the
median of the tokens/s of its windows of 10 steps, the first left out (start-up); variants are run
in turn, `--repeats` times, so drift hits them alike; each tokens/s is the median over repeats and
each ratio the median of the repeats' own ratios (a variant against the DDP run of its round).
Prints a table of tokens/s and each one's ratio to the peer, and one JSON line with everything.
It measures and reports; it asserts nothing.

    python bench/stages_cpu.py --repeats 2
    # beside an earlier commit's ZeRO-3 (variant "base-zero3"), some variants only:
    git worktree add /tmp/base 615f733 && python bench/stages_cpu.py --baseline /tmp/base --variants ddp zero1 zero3
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import REPO, Measurement, machine_info, median, run_logged, torchrun_cmd
from core.files import read_jsonl

SHAPES = {"1.3M": ["model.size=tiny"], "12M": ["model.size=tiny", "model.n_layer=6", "model.n_embd=384", "model.n_head=6"]}
STEPS = {"1.3M": 100, "12M": 50}
EVERY = 10


def variants() -> dict[str, list[str]]:
    off = ["snapshot.every=0", "sidecar.enabled=false"]
    on = ["snapshot.every=20", "sidecar.enabled=true", "lawa.spacing=0"]
    out = {"ddp": []}
    for stage in (1, 2, 3):
        out[f"zero{stage}"] = [f"parallel.zero_stage={stage}", *off]
    for stage in (1, 2, 3):
        out[f"zero{stage}+lawa"] = [f"parallel.zero_stage={stage}", *on]
    return out


def run(name: str, shape: str, extra: list[str], work: Path, commands: list[str],
        checkout: Path = REPO) -> tuple[float, list[float]]:
    """(median tokens/s over windows 2..n, the losses by step) of one run of `checkout`'s launcher."""
    steps = STEPS[shape]
    # The default job's schedule as it was measured (cosine), and none of its scheduled cooldowns (a
    # --baseline checkout may predate that key).
    common = [f"train.steps={steps}", f"data.dir={REPO / 'data/stdlib'}", "schedule.name=cosine",
              *(["cooldowns.at=[]"] if checkout == REPO else []), *SHAPES[shape]]
    log = work / f"{shape}_{name}.log"
    if name == "ddp":
        run_logged(torchrun_cmd("bench/ddp_peer_worker.py", "--job", "jobs/tiny_cpu.yaml", "--steps", str(steps),
                                "--every", str(EVERY), *common), log, commands)
        result = json.loads([ln for ln in log.read_text().splitlines() if ln.startswith("{")][-1])
        return median(result["tokens_per_s"][1:]), result["losses"]
    run_dir = work / f"{shape}_{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_logged(torchrun_cmd("launcher/train.py", "--job", "jobs/tiny_cpu.yaml", f"run_dir={run_dir}", *common,
                            f"logging.every={EVERY}", "eval.every=0", "checkpoint.every=100000000", *extra), log,
               commands, cwd=checkout)
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    windows = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    return median(windows), [losses.get(s) for s in range(1, steps + 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=list(variants()), choices=list(variants()))
    parser.add_argument("--baseline", type=Path, help="another checkout (a git worktree of an earlier commit): its "
                        "launcher at ZeRO-3, snapshots and sidecar off, is the variant base-zero3")
    parser.add_argument("--wait-timeout", type=float, default=600)
    args = parser.parse_args()
    chosen = {name: (extra, REPO) for name, extra in variants().items() if name in args.variants or name == "ddp"}
    if args.baseline is not None:
        chosen["base-zero3"] = (variants()["zero3"], args.baseline.resolve())
    info = machine_info()
    print(json.dumps({"machine": info}), flush=True)
    work = Path(tempfile.mkdtemp(prefix="stages_cpu_"))
    commands: list[str] = []
    figures: dict[str, dict[str, list[float]]] = {}
    losses: dict[str, dict[str, list]] = {}
    contended = False
    try:
        for shape in args.shapes:
            figures[shape], losses[shape] = {}, {}
            for repeat in range(args.repeats):
                for name, (extra, checkout) in chosen.items():
                    with Measurement(f"{shape} {name} #{repeat}", args.wait_timeout) as m:
                        tok_s, step_losses = run(name, shape, extra, work, commands, checkout)
                    contended |= m.contended
                    figures[shape].setdefault(name, []).append(tok_s)
                    losses[shape][name] = step_losses
                    print(f"  {shape} {name} #{repeat}: {tok_s:,.0f} tokens/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = {shape: {name: median(values) for name, values in by_name.items()} for shape, by_name in figures.items()}
    # Single runs on a shared 2-core machine move by ±10%: a variant's ratio is taken within each
    # repeat (its run against the DDP run of the same round) and the median of those is quoted,
    # with their range.
    ratios = {s: {name: sorted(v / d for v, d in zip(values, by_name["ddp"])) for name, values in by_name.items()}
              for s, by_name in figures.items()}
    print("\n| variant | " + " | ".join(f"{s} tokens/s | {s} vs DDP (range)" for s in table) + " |")
    print("|---|" + "---:|---:|" * len(table))
    for name in chosen:
        cells = [f"{table[s][name]:,.0f} | {median(ratios[s][name]):.3f} ({ratios[s][name][0]:.2f}–{ratios[s][name][-1]:.2f})"
                 for s in table]
        print(f"| {name} | " + " | ".join(cells) + " |")
    # The comparison is of one computation: the launcher's losses equal the peer's.
    agreement = {s: max(abs(a - b) / abs(b) for name in chosen if name != "ddp"
                        for a, b in zip(losses[s][name], losses[s]["ddp"]) if a is not None) for s in table}
    print(f"\nlargest relative loss difference from the DDP peer, any variant and step: {agreement}")
    print(json.dumps({"machine": info, "repeats": args.repeats, "steps": STEPS, "tokens_per_s": figures,
                      "ratios_to_ddp": ratios,
                      "median_tokens_per_s": table, "loss_agreement": agreement, "contended": contended,
                      "commands": commands}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
