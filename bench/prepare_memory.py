"""Peak memory of preparing one large plain-text file with no blank lines (so under the default
`blank-line` rule the whole file is one document): the text is streamed in pieces, so memory should
not grow with the file.

    python bench/prepare_memory.py --gb 2 --split blank-line --work /var/tmp/prepare_memory
    python bench/prepare_memory.py --gb 0.2 --repo /tmp/before --work ...   # another checkout, same file

Generates the file once (lines of words and sums from a fixed seed), trains a tokenizer on the
builtin pydoc corpus once (so the measurement is of reading, tokenizing and writing, not of
sentencepiece's trainer), then runs `python -m launcher.prepare` in a child and samples, every
0.2 s, the resident memory of its whole process tree (datasets' worker processes included):
VmRSS, and its anonymous part (RssAnon: what cannot be dropped; memory-mapped Arrow files that
were read count in VmRSS but are clean page cache).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from whole_model_memory import status_kb

from common import REPO, child_env


def make_text(path: Path, gigabytes: float) -> None:
    if path.exists() and path.stat().st_size >= gigabytes * 1e9:
        return
    rng = random.Random(0)
    words = "the of and to in is was for on that with as by at from it his an were are which this be".split()
    lines = []
    for _ in range(200_000):  # a ~10 MB block of varied lines, written with a counter until the size is reached
        if rng.random() < 0.5:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))))
        else:
            a, b = rng.randrange(10_000), rng.randrange(10_000)
            lines.append(f"{a} + {b} = {a + b}")
    block = "\n".join(lines) + "\n"
    written, n = 0, 0
    with open(path, "w") as f:
        while written < gigabytes * 1e9:
            chunk = f"block {n}\n" + block
            f.write(chunk)
            written += len(chunk)
            n += 1


def tree_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) in bytes, summed over pid and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    rss = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        status = status_kb(p)
        rss += status.get("VmRSS", 0) * 1024
        anon += status.get("RssAnon", 0) * 1024
    return rss, anon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--split", default="blank-line")
    parser.add_argument("--work", default="/var/tmp/prepare_memory")
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose launcher.prepare runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / f"text_{args.gb:g}gb.txt"
    make_text(text, args.gb)
    python = sys.executable
    tokenizer_dir = work / "pydoc"
    if not (tokenizer_dir / "tokenizer.model").exists():
        subprocess.run([python, "-m", "launcher.prepare", "--job", "jobs/smoke.yaml", f"data.dir={tokenizer_dir}"],
                       cwd=REPO, env=child_env(), check=True, capture_output=True)
    out_dir = work / f"out_{Path(args.repo).name}_{args.gb:g}gb"
    source = f"{{path: {text}" + (f", split: {args.split}}}" if args.repo == str(REPO) else "}")
    cmd = [python, "-m", "launcher.prepare", "--job", "jobs/smoke.yaml", "--force", f"data.dir={out_dir}",
           f"data.sources=[{source}]", f"data.tokenizer={tokenizer_dir / 'tokenizer.model'}"]
    env = dict(child_env(), PYTHONPATH=args.repo)
    start = time.monotonic()
    with open(work / f"{out_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=args.repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_rss = peak_anon = 0
        while proc.poll() is None:
            rss, anon = tree_memory(proc.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(0.2)
    wall = time.monotonic() - start
    manifest = json.loads((out_dir / "manifest.json").read_text()) if proc.returncode == 0 else None
    result = {"file_gb": text.stat().st_size / 1e9, "split": args.split, "repo": args.repo, "exit": proc.returncode,
              "wall_s": wall, "peak_rss_gb": peak_rss / 1e9, "peak_anon_gb": peak_anon / 1e9,
              "tokens": sum(s["train_tokens"] + s["val_tokens"] for s in manifest["sources"]) if manifest else None,
              "documents": manifest["sources"][0]["documents"] if manifest else None}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
