"""The collectives of each training step, counted: every torch.distributed collective the launcher's
own loop (launcher.trainer.train: the real job, snapshots every 20 steps, the sidecar on) issues
during a run, by step and by who called it (DeepSpeed's engine, or the launcher's own code),
classified from the call stack. A steady-state step (not a log, vote, snapshot, evaluation or
checkpoint step) should issue DeepSpeed's only.

    python bench/step_collectives.py                    # 2 ranks, jobs/smoke.yaml, each ZeRO stage
    python bench/step_collectives.py --stages 3 -- train.vote_every=5
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier", "all_to_all_single",
               "gather_object", "reduce")


def worker(overrides: list[str]) -> None:
    import torch.distributed as dist

    from launcher import trainer
    from launcher.config import load_job

    counts: collections.Counter = collections.Counter()
    state = {"step": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            stack = "".join(traceback.format_stack(limit=40))
            who = "launcher" if any(f"/{p}/" in stack for p in ("launcher", "averaging", "core")) and \
                "deepspeed/runtime" not in stack else "deepspeed"
            counts[(state["step"], who, name)] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, counted(name, getattr(dist, name)))
    step = trainer.Loop.step

    def step_and_count(self):
        state["step"] = self.step_no + 1  # the collectives from here on belong to this step
        return step(self)

    trainer.Loop.step = step_and_count
    job = load_job("jobs/smoke.yaml", overrides)
    trainer.train(job)
    if dist.get_rank() == 0 if dist.is_initialized() else True:
        print(json.dumps({"counts": [[s, who, name, n] for (s, who, name), n in sorted(counts.items())]}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        worker(args.overrides)
        return 0
    import subprocess
    import tempfile

    from common import child_env, machine_info, torchrun_cmd

    print(json.dumps({"machine": machine_info()}), flush=True)
    results = {}
    for stage in args.stages:
        with tempfile.TemporaryDirectory() as run_dir:
            overrides = [f"run_dir={run_dir}", f"train.steps={args.steps}", "logging.every=10", "eval.every=20",
                         "checkpoint.every=20", "snapshot.every=20", "sidecar.enabled=true", f"parallel.zero_stage={stage}",
                         f"snapshot.dir={run_dir}/snaps", *args.overrides]
            proc = subprocess.run(torchrun_cmd(__file__, "--worker", *overrides), cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))), env=child_env(), capture_output=True, text=True, timeout=900)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"counts"')]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"ZeRO-{stage} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        by_step: dict[int, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
        for s, who, name, n in json.loads(line[-1])["counts"]:
            by_step[s][f"{who}:{name}"] += n
        ours = {s: {k: v for k, v in c.items() if k.startswith("launcher:")} for s, c in by_step.items() if s > 0}
        steady = [s for s in range(2, args.steps + 1) if s % 10 and s % 20 and s != args.steps]
        results[stage] = {"per_step": {s: dict(c) for s, c in sorted(by_step.items())},
                          "launcher_steps": sorted(s for s, c in ours.items() if c),
                          "steady_state_launcher_collectives": sum(sum(ours.get(s, {}).values()) for s in steady),
                          "steady_state_deepspeed_collectives_per_step":
                              {k: v for k, v in by_step[steady[0]].items() if k.startswith("deepspeed:")}}
        r = results[stage]
        print(f"ZeRO-{stage}: steady-state steps ({len(steady)} of {args.steps}) issue {r['steady_state_launcher_collectives']} "
              f"collectives of the launcher's; DeepSpeed's per step: {r['steady_state_deepspeed_collectives_per_step']}; "
              f"the launcher's own collectives come at steps {r['launcher_steps']}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
