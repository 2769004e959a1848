"""Peak host memory of the paths that touch whole models, on a Pythia-1.4B-shaped model with random
weights (5.6 GB fp32) in ZeRO-3 files of 2 data-parallel ranks: init_from on the same layout and on
another (tensor 2 × data 1), growth (6 -> 24 layers), HF export, consolidation, and the sidecar's
read of k=5 snapshots into a running sum (plus the raw newest it scores).

Each path runs in its own processes (one per rank where the path is per rank) while this script
samples their resident memory (/proc/PID/status: anonymous, file-mapped, shared memory) every 20 ms;
it reports each process's peak and the node's peak of the summed ranks, above each process's
baseline (the interpreter and, for init_from/growth, the rank's own fp32 partition, which the engine
holds anyway). No DeepSpeed engine is built: a 1.4B engine with Adam does not fit this machine; the
measured code is the project's own reading and cutting, the part that differs between versions.

    python bench/whole_model_memory.py                               # this tree ("after")
    git worktree add /tmp/before 1365155
    python bench/whole_model_memory.py --before-tree /tmp/before     # and the tree before streaming

The "before" ranks run one after another (both at once would not fit in 24 GB); their node figure is
the sum of their peaks. Needs about 40 GB of disk under --work (kept between runs).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("init_same", "init_other", "grow", "export", "consolidate", "sidecar")
RANKS = {"init_same": 2, "init_other": 2, "grow": 2, "export": 1, "consolidate": 1, "sidecar": 1}
K = 5
SMALL_LAYERS = 6
GROWTH = 4


def status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem") if k in fields}


def run_ranks(tree: Path, phase: str, work: Path, size: str, ranks: list[int]) -> list[dict]:
    """Run one child per rank at once; sample them; return per-rank {baseline, peak, peak_anon} (kB)
    and the node's peak sum (first entry's `node_peak`)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    logs = {r: work / f"{phase}.rank{r}.log" for r in ranks}
    children = [subprocess.Popen([sys.executable, __file__, "--child", phase, "--rank", str(r), "--work", str(work),
                                  "--size", size], cwd=tree, env=env, stdout=subprocess.PIPE,
                                 stderr=open(logs[r], "w"), text=True)
                for r in ranks]
    peaks = [dict(peak=0, peak_anon=0) for _ in children]
    node_peak = 0
    while any(c.poll() is None for c in children):
        total = 0
        for c, p in zip(children, peaks):
            s = status_kb(c.pid)
            if s:
                p["peak"] = max(p["peak"], s["VmRSS"])
                p["peak_anon"] = max(p["peak_anon"], s["RssAnon"])
                total += s["VmRSS"]
        node_peak = max(node_peak, total)
        time.sleep(0.02)
    for r, c, p in zip(ranks, children, peaks):
        out = c.stdout.read()
        if c.returncode != 0:
            raise SystemExit(f"{phase} rank {r} failed ({c.returncode}): {out}\n{logs[r].read_text()[-3000:]}")
        p.update(json.loads(out.strip().splitlines()[-1]))
    peaks[0]["node_peak"] = node_peak
    return peaks


# ---------------------------------------------------------------------------------------------
# the measured paths (run in a child, inside the tree under test)


def child(phase: str, rank: int, work: Path, size: str) -> None:
    import torch

    torch.set_num_threads(1)
    from models.registry import model_config

    config = model_config(size)
    src, small, ring = work / "source", work / "small", work / "ring"
    after = os.path.isfile("core/zero_folder.py")
    names, shapes, layout = model_shapes(config)
    started = time.perf_counter()

    def own_partition(cut):
        """What the engine holds anyway: this rank's fp32 master partition."""
        from core.zero_checkpoint import partition_numel
        split = lambda n: layout.get(n) if cut[3] > 1 else None  # noqa: E731
        sizes = {n: partition_numel(shapes[n].numel() // (cut[3] if split(n) else 1), cut[1]) for n in names}
        return {n: torch.empty(s).fill_(0.5) for n, s in sizes.items()}, split  # touched: resident

    def load(cut, source_after, source_before):
        held, split = own_partition(cut)
        baseline = rss_kb()
        if after:
            from core.zero_folder import Cut
            c = Cut(*cut)
            source = source_after()
            for n in names:
                held[n].copy_(source.piece(n, split(n), c))
        else:  # the previous tree's load_weights: a full state dict, then each rank's cut of it
            from core.zero_checkpoint import split_tensor
            full = source_before()
            dp_rank, dp, tp_rank, tp = cut
            for n in names:
                tensor = full[n]
                if split(n):
                    tensor = split_tensor(tensor, *split(n), tp)[tp_rank]
                flat = tensor.reshape(-1).float()
                part = held[n].numel()
                padded = torch.zeros(part * dp)
                padded[: flat.numel()] = flat
                held[n].copy_(padded[dp_rank * part: (dp_rank + 1) * part])
        return baseline, held

    if phase in ("init_same", "init_other"):
        cut = (rank, 2, 0, 1) if phase == "init_same" else (0, 1, rank, 2)
        baseline, held = load(cut, lambda: zero_folder(src), lambda: old_consolidate(src))
        check = float(held[names[0]][:8].sum())
    elif phase == "grow":
        small_config = model_config(size, n_layer=SMALL_LAYERS)

        def grown_after():
            from core.zero_folder import ZeroFolder
            from models.growth import Grown
            return Grown(ZeroFolder(str(small)), small_config, GROWTH)

        def grown_before():
            from models.growth import grow
            return grow(old_consolidate(small), small_config, GROWTH)[0]

        baseline, held = load((rank, 2, 0, 1), grown_after, grown_before)
        check = float(held[names[0]][:8].sum())
    elif phase == "export":
        from models.hf import export
        out = work / "out_export"
        baseline = rss_kb()
        export(zero_folder(src) if after else old_consolidate(src), config, str(out))
        check = sum(f.stat().st_size for f in out.iterdir())
        shutil.rmtree(out)
    elif phase == "consolidate":
        from averaging.consolidate import main
        out = work / ("out_consolidated" if after else "out_consolidated.pt")
        baseline = rss_kb()
        assert main([str(src), "--out", str(out)]) == 0
        check = sum(f.stat().st_size for f in out.iterdir()) if out.is_dir() else out.stat().st_size
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    elif phase == "sidecar":
        # The worker's read: every snapshot of the window read once, oldest first, into the sum; the raw
        # newest kept to score.
        from averaging import slots
        from averaging.lawa import add_weighted
        baseline = rss_kb()
        total, raw = None, None
        for step in range(1, K + 1):
            flat, _ = slots.read_shard(slots.slot_path(str(ring), step), 0, 0)
            total = add_weighted(total, flat, 1.0 / K)
            if step == K:
                raw = flat
            del flat
        check = float(total[0][:8].sum() + raw[0][:8].sum())
    print(json.dumps({"baseline": baseline, "baseline_anon": BASELINE_ANON, "hwm": hwm_kb(), "seconds": round(time.perf_counter() - started, 1),
                      "check": check}))


def zero_folder(path: Path):
    from core.zero_folder import ZeroFolder
    return ZeroFolder(str(path))


def old_consolidate(path: Path):
    from core.zero_checkpoint import consolidate
    return consolidate(str(path))


def rss_kb() -> int:
    global BASELINE_ANON
    now = status_kb(os.getpid())
    BASELINE_ANON = now["RssAnon"]
    return now["VmRSS"]


BASELINE_ANON = 0


def hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def model_shapes(config):
    import torch

    from models.registry import build_model
    from models.tensor_parallel import tensor_parallel_layout

    with torch.device("meta"):
        model = build_model(config)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    return list(shapes), shapes, tensor_parallel_layout(model)


# ---------------------------------------------------------------------------------------------
# the inputs (written once with this tree's writer; both trees read them)


def make_inputs(work: Path, size: str) -> None:
    import torch

    from averaging import slots
    from core.zero_checkpoint import SlotManifest, shapes_to_json
    from core.zero_folder import TensorSource
    from models.registry import config_to_dict, model_config

    class Random(TensorSource):
        def __init__(self, shapes, seed):
            self.shapes, self.seed = shapes, seed

        def names(self):
            return list(self.shapes)

        def shape(self, name):
            return self.shapes[name]

        def tensor(self, name):
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.names().index(name))
            return torch.randn(self.shapes[name], generator=g) * 0.02

    def write(folder: Path, config, seed: int) -> None:
        if (folder / "COMMITTED").exists():
            return
        shutil.rmtree(folder, ignore_errors=True)
        names, shapes, _ = model_shapes(config)
        groups = [[n for n in names if len(shapes[n]) == 2], [n for n in names if len(shapes[n]) < 2]]
        t = time.perf_counter()
        files = slots.write_weights(str(folder), Random(shapes, seed), 2, 1, {}, groups)
        param_shapes = shapes_to_json([{n: shapes[n] for n in g} for g in groups])
        slots.commit(str(folder), SlotManifest(kind="raw", step=seed, tokens=0, lr=None, dp=2, tp=1,
                                               param_shapes=param_shapes, files=files))
        print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)

    config = model_config(size)
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.json").write_text(json.dumps(config_to_dict(config)))
    for step in range(1, K + 1):
        write(work / "ring" / f"step_{step:08d}", config, step)
    if not (work / "source").exists():
        os.symlink(work / "ring" / f"step_{K:08d}", work / "source")
    write(work / "small", model_config(size, n_layer=SMALL_LAYERS), 99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="pythia-1.4b")
    parser.add_argument("--work", default="/var/tmp/whole_model_memory", help="inputs (kept) and outputs")
    parser.add_argument("--before-tree", default=None, help="a checkout before streaming, measured too")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.child:
        child(args.child, args.rank, work, args.size)
        return 0
    sys.path.insert(0, str(REPO))
    from models.registry import model_config

    make_inputs(work, args.size)
    names, shapes, _ = model_shapes(model_config(args.size))
    copy_gb = 4 * sum(s.numel() for s in shapes.values()) / 1e9
    shard_gb = copy_gb / 2
    print(f"{args.size}: one fp32 copy {copy_gb:.2f} GB; a rank's shard (data 2) {shard_gb:.2f} GB; "
          f"peaks above each process's baseline, GB")
    print("| path | tree | per process peak (of which anonymous) | node peak (summed ranks) | × one copy | "
          "× shard | s |")
    print("|---|---|---|---|---|---|---|")
    trees = [("after", REPO)] + ([("before", Path(args.before_tree))] if args.before_tree else [])
    for phase in args.phases.split(","):
        for label, tree in trees:
            ranks = list(range(RANKS[phase]))
            if label == "before":  # one at a time: together they would not fit
                results = [run_ranks(tree, phase, work, args.size, [r])[0] for r in ranks]
                node = sum(r["peak"] - r["baseline"] for r in results)
            else:
                results = run_ranks(tree, phase, work, args.size, ranks)
                node = results[0]["node_peak"] - sum(r["baseline"] for r in results)
            per = max(r["peak"] - r["baseline"] for r in results)
            anon = max(r["peak_anon"] - r["baseline_anon"] for r in results)
            checks = {r["check"] for r in results}
            print(f"| {phase} | {label} | {per / 1e6:.2f} ({anon / 1e6:.2f}) | {node / 1e6:.2f} | {node / 1e6 / copy_gb:.2f} | "
                  f"{per / 1e6 / shard_gb:.2f} | {max(r['seconds'] for r in results)} |  "
                  f"(check {sorted(checks)[0]:.6g})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
