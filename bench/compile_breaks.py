"""What torch.compile sees of the launcher's model under each ZeRO stage: graphs and graph breaks,
by dynamo's own explanation (torch._dynamo.explain), and the losses of a few steps compiled vs eager.

  - ZeRO-3, hooks as DeepSpeed puts them: one transformer block, whose every linear and norm carries
    ZeRO-3's compile-disabled fetch/release hooks;
  - ZeRO-3 with the blocks as leaf modules (core.deepspeed_compat.treat_as_leaves, what
    train.compile does): the same block;
  - ZeRO-1 and ZeRO-2: the whole model (their hooks run in backward only).

Then, per stage, `--steps` training steps of the launcher's own step (launcher.trainer.build,
train_step) with train.compile=aot_eager and without, printing the largest relative loss difference.
One process (world 1), fp32, CPU: graph counts do not depend on the world size.

    python bench/compile_breaks.py --job jobs/smoke.yaml --steps 4
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine_info  # noqa: E402


def explain(fn, *args) -> dict:
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args)
    reasons = sorted({str(b.reason).splitlines()[0][:120] for b in out.break_reasons})
    return {"graphs": out.graph_count, "graph_breaks": out.graph_break_count, "reasons": reasons[:5]}


def build(job, stage: int, leaves: bool):
    from core.deepspeed_compat import treat_as_leaves, use_deepspeed
    from core.distributed import init_distributed
    from core.engine import deepspeed_config
    from launcher.optim import build_optimizer
    from models.registry import build_model

    par = init_distributed(1)
    config = job.model.resolve(4096, job.data.seq_len, 1)
    ds = deepspeed_config(job.train.micro_batch_size, 1, 1, 1.0, stage, bf16=False)
    deepspeed = use_deepspeed("cpu")
    with deepspeed.zero.Init(config_dict_or_path=ds, data_parallel_group=par.dp_group, mpu=par, enabled=stage == 3):
        model = build_model(config, None)
    if leaves:
        treat_as_leaves(model, [type(model.blocks[0])])
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, job.optimizer, par.device),
                                      config=ds, mpu=par)
    return engine, config


def losses(job_path: str, overrides: list[str], steps: int) -> list[float]:
    from launcher import trainer
    from launcher.config import load_job

    t = trainer.build(load_job(job_path, overrides))
    return [trainer.train_step(t, i)[0].item() for i in range(steps)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/smoke.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case per process (a fresh engine)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29_000 + os.getpid() % 1000))
    if args.case is None:  # the driver: each case in a process of its own
        import subprocess

        print(json.dumps({"machine": machine_info()}))
        results = {}
        cases = ["zero3_hooks", "zero3_leaf_blocks", "zero1", "zero2",
                 *(f"losses{s}_{mode}" for s in (1, 2, 3) for mode in ("eager", "compiled"))]
        for case in cases:
            out = subprocess.run([sys.executable, __file__, "--job", args.job, "--steps", str(args.steps), "--case", case,
                                  *args.overrides], capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{case} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            results[case] = json.loads(line[-1])
            print(f"{case}: {results[case]}", flush=True)
        for stage in (1, 2, 3):
            eager, compiled = results[f"losses{stage}_eager"]["losses"], results[f"losses{stage}_compiled"]["losses"]
            diff = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
            results[f"zero{stage}_compiled_vs_eager_max_rel_loss_diff"] = diff
            print(f"ZeRO-{stage}: {args.steps} steps compiled (aot_eager) vs eager, largest relative loss difference {diff:.2e}")
        print(json.dumps(results))
        return 0

    import torch

    from launcher.config import load_job

    job = load_job(args.job, args.overrides)
    x = torch.randint(0, 4096, (job.train.micro_batch_size, job.data.seq_len))
    if args.case.startswith("zero3"):
        import deepspeed

        leaves = args.case == "zero3_leaf_blocks"
        engine, _ = build(job, 3, leaves=leaves)
        block = engine.module.blocks[0]
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            h = (engine.module.wte(x) if hasattr(engine.module, "wte") else engine.module.embed_in(x)).detach()
        # What train.compile compiles: the block's forward. A leaf block's parameters are fetched once, on
        # entry, by its hook in __call__ (here by hand); otherwise each submodule's hooks fetch its own.
        if leaves:
            with deepspeed.zero.GatheredParameters(list(block.parameters())):
                result = explain(block.forward, h)
        else:
            result = explain(block.forward, h)
    elif args.case in ("zero1", "zero2"):
        engine, _ = build(job, int(args.case[-1]), leaves=False)
        result = explain(engine.module.forward, x, x)
    else:
        stage, mode = args.case[len("losses"):].split("_")
        overrides = [*args.overrides, f"parallel.zero_stage={stage}", "snapshot.every=0", "sidecar.enabled=false",
                     f"run_dir=/tmp/compile_breaks_{os.getpid()}", *(["train.compile=aot_eager"] if mode == "compiled" else [])]
        result = {"losses": losses(args.job, overrides, args.steps)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
