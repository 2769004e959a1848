"""Peak memory of offline LAWA over Hugging Face checkpoints vs the size of one checkpoint.

Writes `--k` random GPT-NeoX checkpoints of a Pythia shape (fp16 safetensors, like Pythia's own
revisions) into --work, then runs `python -m averaging.offline` over them while sampling its
anonymous and total resident memory, and prints the peaks next to one checkpoint's size.

    python bench/hf_average_memory.py --size pythia-2.8b --k 5 --work /tmp/hf_avg_bench
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.hf import hf_config, name_map  # noqa: E402
from models.registry import build_model, model_config  # noqa: E402


def shapes(config) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from a meta-device model (nothing allocated)."""
    with torch.device("meta"):
        model = build_model(config)
    ours = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return {theirs: ours[name] for name, theirs in name_map(config).items() if name in ours}


def write_checkpoint(folder: str, config, seed: int) -> int:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {name: (torch.randn(shape, generator=g) * 0.02).half() for name, shape in shapes(config).items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    hf_config(config).save_pretrained(folder)
    return os.path.getsize(os.path.join(folder, "model.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="pythia-1b")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--work", default="/tmp/hf_avg_bench")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    config = model_config(args.size)
    shutil.rmtree(args.work, ignore_errors=True)
    inputs = []
    start = time.perf_counter()
    for i in range(args.k):
        folder = os.path.join(args.work, f"step{1000 * (i + 1)}")
        size = write_checkpoint(folder, config, i)
        inputs.append(folder)
        print(f"wrote {folder}: {size / 2**30:.2f} GiB", flush=True)
    print(f"inputs written in {time.perf_counter() - start:.0f}s", flush=True)
    out = os.path.join(args.work, "avg")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "averaging.offline", "--out", out, *inputs],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # RSS counts the inputs' memory-mapped pages, which the kernel drops under pressure; the memory
    # the average really needs is its anonymous resident memory.
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        status = open(f"/proc/{proc.pid}/status").read()
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", status, re.M))
        peak_anon = max(peak_anon, int(fields.get("RssAnon", 0)))
        peak_rss = max(peak_rss, int(fields.get("VmRSS", 0)))
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(stdout[-2000:], stderr[-4000:])
        return 1
    result = {"size": args.size, "k": args.k, "checkpoint_gib": size / 2**30,
              "peak_anonymous_gib": peak_anon / 2**20, "peak_anonymous_over_checkpoint": peak_anon * 1024 / size,
              "peak_rss_with_mapped_inputs_gib": peak_rss / 2**20, "average_wall_s": wall}
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
