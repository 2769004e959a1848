"""lm-evaluation-harness tasks on any folder a run writes, with no conversion: a snapshot slot,
`lawa_best/`, a merge's best, a checkpoint (any ZeRO stage and tensor-parallel layout, streamed
tensor by tensor into one model), or a Hugging Face folder of ours.

    python -m averaging.lm_eval runs/x/lawa_best/step_00002000 --tasks my_task --include_path my_tasks/
    python -m averaging.lm_eval runs/x/checkpoints/step_00001000 --tasks lambada.jsonl piqa.jsonl --limit 200

Prints the harness's own table and writes its results JSON (`--output_path`). Task names are the
harness's (its built-in tasks need their data in the local datasets cache: nothing downloads) or
those of the YAMLs under `--include_path`; a `.jsonl` file is one of the two formats in
`averaging/harness.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from averaging.harness import HarnessTaskError, ShardedLM, evaluate, load_tasks
from averaging.scoring import DEFAULT_BATCH_TOKENS, full_logits
from core import pickles


def load_model(folder: str, run_dir: Optional[str]):
    """Our model with a run folder's weights (or an HF folder's), loaded tensor by tensor."""
    from core.zero_folder import load_module
    from models.hf import weight_source
    from models.registry import build_model

    source, config, run_dir = weight_source(folder, run_dir)
    model = build_model(config).eval()
    load_module(model, source)
    return model, config, run_dir


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m averaging.lm_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run's slot/average/checkpoint folder, or a Hugging Face folder of ours")
    parser.add_argument("--tasks", nargs="+", required=True, help="harness task names and/or .jsonl files")
    parser.add_argument("--include_path", "--include-path", default=None, help="a folder of your task YAMLs")
    parser.add_argument("--limit", type=int, default=0, help="first N examples of each task (0: all)")
    parser.add_argument("--output_path", "--output-path", default=None,
                        help="write the harness's results JSON here (a .json file, or a folder for results.json)")
    parser.add_argument("--run-dir", default=None, help="the run the folder came from (default: found above it)")
    parser.add_argument("--tokenizer", default=None, help="default: the run's tokenizer, or the HF folder's")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="padded tokens per forward (default 2048; one sequence at least)")
    pickles.add_trust_option(parser)
    args = parser.parse_args(argv)
    try:
        from core.tokenizer import load_tokenizer
        from models.hf import run_tokenizer

        tasks = load_tasks(args.tasks, args.include_path)
        with pickles.trusting(args.trust_pickle):
            model, config, run_dir = load_model(args.model, args.run_dir)
        tokenizer_path = args.tokenizer or (run_tokenizer(run_dir) if run_dir else args.model)
        if tokenizer_path is None:
            raise ValueError("cannot tell which tokenizer the model was trained with: pass --tokenizer")
        tokenizer = load_tokenizer(tokenizer_path)
    except (ValueError, FileNotFoundError, KeyError) as e:  # HarnessTaskError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    lm = ShardedLM(full_logits(model.to(device)), tokenizer, config.block_size, device,
                   batch_tokens=args.batch_tokens or DEFAULT_BATCH_TOKENS)
    try:
        results = evaluate(lm, tasks, args.limit, bootstrap_iters=100_000)
    except HarnessTaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output_path:
        out = args.output_path
        if not out.endswith(".json"):
            os.makedirs(out, exist_ok=True)
            out = os.path.join(out, "results.json")
        with open(out, "w") as f:
            json.dump({"model": os.path.abspath(args.model), **results}, f, indent=2, default=str)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
