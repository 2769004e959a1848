"""Preparing a large text corpus: tokens per second with 1 and with N worker processes, and the peak
memory of the whole process tree.

    python bench/prepare_throughput.py --gb 1 --processes 1,2 --work /var/tmp/prepare_throughput
    python bench/prepare_throughput.py --gb 0.2 --one-document --processes 1 --work ...   # no blank line anywhere

The corpus is generated once: documents of real text (the standard library's sources, CPython's
pydoc topics and, where ../shared/data holds it, Tiny Shakespeare) cycled with a counter line until
the size is reached, separated by blank lines (or, with --one-document, none: the whole file is one
document, read in pieces). The tokenizer is a byte-level BPE of --vocab entries trained once on that
text's sources (so what is timed is reading, tokenizing and writing, not the trainer). Each
measurement is `python -m launcher.prepare --processes P` on a fresh data dir, timed as a whole
process; memory is sampled every SAMPLE_S seconds over the process and its workers (sparingly:
reading a process's memory map costs CPU that the workers would otherwise have): the sum of PSS (each
shared page counted once, split among the processes sharing it: the memory the tree really holds)
and of RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, child_env, machine_info

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SAMPLE_S = 2.0


def source_documents() -> list[str]:
    from launcher.data.sources import _pydoc_documents, _stdlib_documents

    docs = _stdlib_documents() + _pydoc_documents()
    if SHAKESPEARE.exists():
        docs += [d for d in SHAKESPEARE.read_text().split("\n\n") if d.strip()]
    # Blank lines inside a document would split it: each becomes one paragraph-free block.
    return ["\n".join(line for line in d.splitlines() if line.strip()) for d in docs]


def make_corpus(path: Path, gigabytes: float, one_document: bool) -> None:
    if path.exists() and path.stat().st_size >= gigabytes * 1e9:
        return
    docs = source_documents()
    written, n = 0, 0
    with open(path.with_suffix(".partial"), "w") as f:
        while written < gigabytes * 1e9:
            text = f"Document {n}\n{docs[n % len(docs)]}\n" + ("" if one_document else "\n")
            f.write(text)
            written += len(text.encode())
            n += 1
    path.with_suffix(".partial").rename(path)


def train_tokenizer(work: Path, vocab: int) -> Path:
    out = work / f"bpe_{vocab}"
    if not (out / "tokenizer.json").exists():
        from core.tokenizer import train_byte_level_bpe

        train_byte_level_bpe(source_documents(), vocab).save(str(out))
    return out / "tokenizer.json"


def tree(pid: int) -> list[int]:
    """pid and its descendants, from the kernel's children lists (no walk over every process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """(PSS, RSS) in bytes, summed."""
    pss = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pss += int(fields.get("Pss", "0 kB").split()[0]) * 1024
        rss += int(fields.get("Rss", "0 kB").split()[0]) * 1024
    return pss, rss


def measure(text: Path, tokenizer: Path, work: Path, processes: int, unit_mb: float) -> dict:
    out = work / f"data_p{processes}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "launcher.prepare", "--job", "jobs/smoke.yaml", f"data.dir={out}",
           f"data.sources=[{{path: {text}}}]", f"data.tokenizer={tokenizer}", "--processes", str(processes),
           "--unit-mb", str(unit_mb)]
    log = work / f"prepare_p{processes}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
        peak_pss = peak_rss = 0
        while proc.poll() is None:
            pss, rss = memory(tree(proc.pid))
            peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
            time.sleep(SAMPLE_S)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: see {log}")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["train_tokens"] + s["val_tokens"] for s in manifest["sources"])
    return {"processes": processes, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "mb_per_s": text.stat().st_size / 1e6 / wall, "peak_pss_gb": peak_pss / 1e9, "peak_rss_gb": peak_rss / 1e9,
            "documents": manifest["sources"][0]["documents"], "command": " ".join(cmd[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--processes", default="1,2", help="comma-separated worker counts, measured in this order")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the whole list, interleaved")
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--unit-mb", type=float, default=64.0)
    parser.add_argument("--one-document", action="store_true", help="no blank line anywhere: one huge document")
    parser.add_argument("--work", default="/var/tmp/prepare_throughput")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / f"corpus_{args.gb:g}gb{'_one_document' if args.one_document else ''}.txt"
    make_corpus(text, args.gb, args.one_document)
    tokenizer = train_tokenizer(work, args.vocab)
    counts = [int(p) for p in args.processes.split(",")]
    rows = []
    for round_ in range(args.repeats):
        for p in counts:
            rows.append({**measure(text, tokenizer, work, p, args.unit_mb), "round": round_})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:  # against the first count's run of the same round
        first = next(r for r in rows if r["round"] == row["round"] and r["processes"] == counts[0])
        row["speedup"] = first["wall_s"] / row["wall_s"]
    result = {"machine": machine_info(), "corpus_gb": text.stat().st_size / 1e9, "vocab": args.vocab,
              "one_document": args.one_document, "rows": rows}
    print(json.dumps(result, indent=1))
    print(f"| round | processes | wall | tokens | tokens/s | MB/s | speedup vs {counts[0]} | peak PSS (tree) | peak RSS (tree) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round'] + 1} | {r['processes']} | {r['wall_s']:.0f} s | {r['tokens'] / 1e6:.1f}M | "
              f"{r['tokens_per_s'] / 1e6:.2f}M | {r['mb_per_s']:.2f} | {r['speedup']:.2f}× | {r['peak_pss_gb']:.2f} GB | "
              f"{r['peak_rss_gb']:.2f} GB |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
