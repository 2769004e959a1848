"""bench/gpu_check.py's results as Markdown tables (OUT/gpu_check.md), from its gpu_check.json."""
from __future__ import annotations

from typing import Any


def markdown(res: dict[str, Any]) -> str:
    env = res["environment"]
    dry = " — DRY RUN on CPU, tiny sizes: no figure here is a GPU figure" if env["dry"] else ""
    lines = [f"# GPU check — {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}, "
             f"Python {env['python']}{dry}", "", f"`{env['command']}`", ""]
    for title, part, section in (("1. Correctness", "correctness", correctness),
                                 ("2. Throughput (one device; tokens per optimizer step as given)", "throughput",
                                  throughput),
                                 ("3. LAWA's cost", "lawa_cost", lawa_cost),
                                 ("4. Zero-shot scoring (examples/s)", "zero_shot", zero_shot)):
        lines += [f"## {title}", ""]
        result = res.get(part)
        if result is None:
            lines.append("not run (--parts)" if part not in env.get("parts", [part]) else "not reached")
        elif "error" in result:
            lines.append(f"FAILED: {result['error']}")
        elif "skipped" in result and len(result) == 1:
            lines.append(f"skipped: {result['skipped']}")
        else:
            lines += section(result)
        lines.append("")
    lines.append(f"total {res['total_s']:.0f} s of a {env.get('budget_s', 0):.0f} s budget")
    return "\n".join(lines) + "\n"


def correctness(c: dict[str, Any]) -> list[str]:
    r, e = c["resume"], c["export"]
    resume = "not run" if r.get("max_abs_loss_diff") is None else \
        f"{r['max_abs_loss_diff']:.2e} nats (step {r['at_step']})"
    bf16 = e["transformers_bf16"] is not None
    nearest = e.get("nearest_other_average")
    lines = ["| check | measured | tolerance | ok |", "|---|---|---|---|",
             f"| stopped at step 6 and resumed vs uninterrupted (deterministic), max loss difference | {resume} "
             f"| {r['tolerance']:.0e} nats | {ok(r['failure'] is None)} |",
             f"| export, our model vs transformers, fp32 | {e['ours_fp32']:.6f} vs {e['transformers_fp32']:.6f} "
             f"(rel {e['fp32_rel_diff']:.1e}) | {e['fp32_tolerance']:.0e} rel "
             f"| {ok(e['fp32_rel_diff'] <= e['fp32_tolerance'])} |",
             f"| best LAWA (step {c['lawa_best_step']}): sidecar vs transformers in {'bf16' if bf16 else 'fp32'} "
             f"| {e['sidecar_loss']:.6f} vs {e['transformers_bf16'] if bf16 else e['transformers_fp32']:.6f} "
             f"({e['sidecar_diff']:.1e} nats) | {e['tolerance']:.1e} nats"
             + (f" (bf16's own effect {e['bf16_effect']:.1e})" if bf16 else "")
             + f" | {ok(e['sidecar_diff'] <= e['tolerance'])} |"]
    if nearest:
        lines.append(f"| what the tolerance must resolve: the nearest other average at that step ({nearest[0]}) "
                     f"| {nearest[1]:.1e} nats away | | {ok(nearest[1] > e['tolerance'])} |")
    lines += [f"| sidecar evaluations (kinds) | {c['sidecar_evals']} ({', '.join(c['sidecar_kinds'])}) | | |",
              f"| peak memory | {c['max_mem_gb']:.2f} GB | | |",
              f"| all | | | {ok(c['ok'])} |"]
    lines += ["", *[f"- FAILED {f}" for f in c["failures"]]] if c["failures"] else []
    return lines


def ok(value: bool) -> str:
    return "yes" if value else "NO"


def throughput(rows: dict[str, Any]) -> list[str]:
    lines = ["| size | what | tokens/step | tokens/s | model TFLOP/s | peak GB | vs reference | loss diff vs default |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for size, row in rows.items():
        for what, r in row.items():
            if what == "best":
                continue
            if "tokens_per_s" not in r:
                lines.append(f"| {size} | {what} | {r.get('error') or 'skipped: ' + str(r.get('skipped'))} | | | | | |")
                continue
            mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "–"
            ratio = f"{r['ratio_vs_reference']:.3f}" if "ratio_vs_reference" in r else "–"
            diff = f"{r['max_rel_loss_diff_vs_default']:.1e}" if "max_rel_loss_diff_vs_default" in r else "–"
            lines.append(f"| {size} | {what} | {r['tokens_per_step']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['model_tflops']:.1f} | {mem} | {ratio} | {diff} |")
        lines.append(f"| {size} | **best launcher variant** | {row.get('best')} | | | | | |")
    return lines


def lawa_cost(lc: dict[str, Any]) -> list[str]:
    share = lc["stall_share_at_every_200"]
    return ["| figure | value |", "|---|---:|",
            f"| tokens/s, snapshots + sidecar on / off ({lc['size']}) | {lc['on']['tokens_per_s']:,.0f} / "
            f"{lc['off']['tokens_per_s']:,.0f} = {lc['ratio_on_off']:.3f} |",
            f"| loop stall per snapshot | {lc['stall_per_snapshot_s'] * 1e3:.2f} ms |",
            "| stall share of training time at snapshot.every=200 | "
            + (f"{share:.4%} |" if share is not None else "– |")]


def zero_shot(zs: dict[str, Any]) -> list[str]:
    lines = [f"{zs['size']} on {zs['device']}:", "", "| task | one per forward | batched | ratio | metrics equal |",
             "|---|---|---|---|---|"]
    return lines + [f"| {task} | {r['examples'] / r['before_s']:.2f} | {r['examples'] / r['after_s']:.2f} | "
                    f"{r['ratio']:.1f}x | {r['metrics_equal']} |" for task, r in zs.items() if isinstance(r, dict)]
