"""The peer the launcher is measured against: a plain PyTorch DistributedDataParallel loop of the
same model, batches, optimizer (AdamW with the launcher's decay groups), learning-rate schedule and
gradient clipping, with no ZeRO, no snapshots and no sidecar. Started by bench/stages_cpu.py under
torchrun; rank 0 prints one JSON line: the tokens/s of each window of `--every` steps, and each
step's loss averaged over the ranks (the launcher's, to fp32 rounding: the same computation).

    torchrun --standalone --nproc_per_node 2 bench/ddp_peer_worker.py --job jobs/tiny_cpu.yaml --steps 120
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launcher.config import load_job  # noqa: E402
from launcher.data import ensure_prepared, job_batches  # noqa: E402
from launcher.optim import build_optimizer  # noqa: E402
from models.registry import build_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/tiny_cpu.yaml")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=10, help="steps per timed window")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    job = load_job(args.job, args.overrides)
    manifest = ensure_prepared(job.data, rank == 0, dist.barrier, dist.get_world_size())
    batches = job_batches(job.data, manifest, job.train.seed)
    config = job.model.resolve(batches.vocab_size, job.data.seq_len, 1)
    torch.manual_seed(job.train.seed)
    model = torch.nn.parallel.DistributedDataParallel(build_model(config))
    optimizer = build_optimizer(model.module, job.optimizer, torch.device("cpu"))
    accum = job.train.accumulation_steps(world)
    micro = job.train.micro_batch_size
    tokens_per_step = job.tokens_per_step
    windows, losses = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = job.learning_rate(step)
        torch.manual_seed(job.train.seed * 1_000_003 + step * 1009 + rank)
        total = 0.0
        for m in range(accum):
            x, y = batches.train_batch(step, rank, m, micro)
            sync = contextlib.nullcontext() if m == accum - 1 else model.no_sync()
            with sync:
                _, loss = model(x, y)
                (loss / accum).backward()
            total += loss.item()
        if job.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), job.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total / accum)
        if (step + 1) % args.every == 0:
            now = time.perf_counter()
            windows.append(args.every * tokens_per_step / (now - start))
            start = now
    mean = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(mean)  # the data-parallel mean, as the launcher logs it
    if rank == 0:
        print(json.dumps({"tokens_per_s": windows, "losses": (mean / world).tolist()}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
