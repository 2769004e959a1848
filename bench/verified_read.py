"""What verifying every read costs: the throughput of reading a slot's files with the checksum
check (core.integrity.load_verified against the manifest's record, as every reader now does) and
without it (the same weights-only load, no record), in RAM (/dev/shm) and from a disk's page cache;
and what recording a checkpoint file costs its writer (fsync + xxh3 of a file just written).

Writes one committed slot of `--mb` MB of fp32 weights in `--ranks` rank files into each place, then
reads every rank's flat groups `--repeats` times each way, touching every element (a sum), as the
sidecar's averaging does; prints MB/s per place and way, their ratio, and xxh3 alone. Then writes a
`--mb` MB file to disk without fsync (as DeepSpeed's save leaves it) and times record_file(fsync=True).

    python bench/verified_read.py --mb 1024 --ranks 2 --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine_info  # noqa: E402
from core.integrity import checksum, load_verified, record_file  # noqa: E402
from core.zero_checkpoint import optim_states_file  # noqa: E402


def write_slot(folder: str, mb: int, ranks: int):
    from averaging import slots
    from core.zero_folder import StateDictSource

    numel = mb * 2**20 // 4
    rows = 1024
    weights = {f"w{i}": torch.randn(rows, numel // rows // 8) for i in range(8)}
    files = slots.write_weights(folder, StateDictSource(weights), ranks, 1, {})
    manifest = slots.SlotManifest(kind="raw", step=1, tokens=0, lr=None, dp=ranks, tp=1,
                                  param_shapes=[[[n, list(t.shape)] for n, t in weights.items()]], files=files)
    slots.commit(folder, manifest)
    return manifest


def read_all(folder: str, ranks: int, records) -> float:
    """Seconds to load every rank's optimizer file and touch every element."""
    start = time.perf_counter()
    total = 0.0
    for rank in range(ranks):
        name = optim_states_file(rank, 0)
        obj = load_verified(os.path.join(folder, name), records.get(name) if records else None)
        total += sum(float(t.sum()) for t in obj["optimizer_state_dict"]["fp32_flat_groups"])
    assert total == total  # not NaN: every element was read
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="slot size in MB (default %(default)s)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    info = machine_info()
    print(json.dumps({"machine": info}))
    places = {"ram (/dev/shm)": tempfile.mkdtemp(prefix="verified_read_", dir="/dev/shm"),
              "disk (page cache)": tempfile.mkdtemp(prefix="verified_read_")}
    results = {}
    try:
        for place, root in places.items():
            folder = os.path.join(root, "step_00000001")
            manifest = write_slot(folder, args.mb, args.ranks)
            size = sum(r["bytes"] for n, r in manifest.files.items() if "optim" in n)
            read_all(folder, args.ranks, None)  # warm the page cache
            timings = {"unverified": [], "verified": []}
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                timings["unverified"].append(read_all(folder, args.ranks, None))
                timings["verified"].append(read_all(folder, args.ranks, manifest.files))
            with open(os.path.join(folder, optim_states_file(0, 0)), "rb") as f:
                data = f.read()
            start = time.perf_counter()
            checksum(data)
            hash_s = time.perf_counter() - start
            row = {way: size / statistics.median(t) / 1e6 for way, t in timings.items()}
            row["ratio_verified_to_unverified"] = row["verified"] / row["unverified"]
            row["xxh3_only_mb_s"] = len(data) / hash_s / 1e6
            results[place] = row
            print(f"{place}: {size / 1e6:.0f} MB in {args.ranks} files; read and touched: unverified "
                  f"{row['unverified']:.0f} MB/s, verified {row['verified']:.0f} MB/s "
                  f"(ratio {row['ratio_verified_to_unverified']:.3f}); xxh3 alone {row['xxh3_only_mb_s']:.0f} MB/s")
        fresh = os.path.join(places["disk (page cache)"], "fresh.bin")
        chunk = os.urandom(1 << 20)
        with open(fresh, "wb") as f:
            for _ in range(args.mb):
                f.write(chunk)
        start = time.perf_counter()
        record_file(fresh, fsync=True)
        results["record_fresh_file_mb_s"] = args.mb * 2**20 / (time.perf_counter() - start) / 1e6
        print(f"recording a file just written to disk (fsync + xxh3): {results['record_fresh_file_mb_s']:.0f} MB/s")
    finally:
        for root in places.values():
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"mb": args.mb, "ranks": args.ranks, "repeats": args.repeats, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
