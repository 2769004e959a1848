"""The offline merge command: which checkpoints (a folder's latest k, or a token window), each
one's weight, and the merge written staged, in the inputs' layout."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from averaging import lawa, slots
from averaging.offline.common import UsageError
from averaging.offline.files import average_files, average_hf
from averaging.offline.zero import average_deepspeed, average_slots
from core import pickles
from core.config import ArgumentParser
from core.files import OutputExists, any_step_of, staged, write_file_atomic
from core.log import logger, setup_logging
from core.run_dir import LATEST, MANIFEST, RUN_STATE
from core.weights import HF_INDEXES, HF_SINGLE
from core.zero_checkpoint import RunState

TORCH_EXTS = (".pt", ".bin", ".pth")


def kind_of(path: str) -> str:
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "safetensors"
        if path.endswith(TORCH_EXTS):
            return "torch"
        raise UsageError(f"{path}: not a .safetensors/.pt/.bin/.pth file")
    names = set(os.listdir(path))
    # A slot also holds *_model_states.pt: its manifest is what tells it apart.
    if MANIFEST in names or slots.is_committed(path):
        return "slot"
    if any(n.endswith("model_states.pt") for n in names):
        return "deepspeed"
    if names & set(HF_INDEXES + HF_SINGLE):
        return "hf"
    raise UsageError(f"{path}: neither a slot, a DeepSpeed tag folder nor a Hugging Face model folder")


def tokens_of(path: str) -> Optional[int]:
    """The tokens trained when a folder of ours was written (a slot's manifest, a checkpoint's run state)."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return slots.read_manifest(path).tokens
    if os.path.isfile(os.path.join(path, RUN_STATE)):
        return RunState.read(path).tokens
    return None


def pick_from_dir(root: str, k: Optional[int], spacing: int, window_tokens: Optional[int] = None,
                  tokens_per_step: Optional[int] = None) -> list[str]:
    """The step-named subfolders of root a merge takes: the newest k spaced apart, or every one so
    spaced within window_tokens of the newest; oldest first."""
    if not os.path.isdir(root):
        raise UsageError(f"{root}: no such directory")
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root)):
        path, step = os.path.join(root, name), any_step_of(name)
        if step is None or not os.path.isdir(path):
            continue
        if step in found:
            raise UsageError(f"{root}: both {os.path.basename(found[step])} and {name} are step {step}")
        found[step] = path
    # Torn folders look like checkpoints: only committed slots / complete launcher checkpoints count.
    if any(slots.is_committed(p) or os.path.exists(os.path.join(p, MANIFEST)) for p in found.values()):
        usable, what = slots.is_committed, "committed slots"
    elif any(os.path.isfile(os.path.join(p, RUN_STATE)) for p in found.values()):
        usable, what = (lambda p: os.path.isfile(os.path.join(p, RUN_STATE))), "complete checkpoints"
    else:
        usable, what = (lambda p: True), ""
    skipped = sorted(s for s, p in found.items() if not usable(p))
    if skipped:
        logger.info(f"skipping steps {skipped}: not {what}")
    found = {s: p for s, p in found.items() if usable(p)}
    chosen = lawa.select_spaced(found, k if k is not None else len(found), spacing)
    if not chosen:
        raise UsageError(f"{root}: no step_N, global_stepN or checkpoint-N checkpoints in it")
    if window_tokens is not None:
        tokens = {s: tokens_of(found[s]) for s in chosen}
        if any(t is None for t in tokens.values()):
            if tokens_per_step is None:
                unknown = next(found[s] for s, t in tokens.items() if t is None)
                raise UsageError(f"--window-tokens: {unknown} does not record its tokens; give --tokens-per-step")
            tokens = {s: s * tokens_per_step for s in chosen}
        chosen = [s for s in chosen if tokens[chosen[0]] - tokens[s] <= window_tokens]
        logger.info(f"chose steps {chosen} from {root}: every one within {window_tokens:,} tokens of the newest"
                    f"{f' at spacing {spacing}' if spacing else ''}")
    else:
        note = f" (only {len(chosen)} of {k} available at spacing {spacing})" if len(chosen) < k else ""
        logger.info(f"chose steps {chosen} from {root}{note}")
    return [found[s] for s in sorted(chosen)]


def input_weights(inputs: list[str], weighting: str) -> Optional[dict[str, float]]:
    """Each input's weight in the merge (oldest first by step, as the sidecar weights snapshots);
    None for uniform (the plain mean: a sum and one division, as the sidecar's LAWA)."""
    if weighting == "uniform":
        return None
    steps = {p: slots.read_manifest(p).step if os.path.isfile(os.path.join(p, MANIFEST)) else
             any_step_of(os.path.splitext(p)[0]) for p in inputs}
    unknown = [p for p, s in steps.items() if s is None]
    if unknown:
        raise UsageError(f"--weights {weighting}: cannot tell the step of {unknown[0]} (a step_N, global_stepN or "
                         f"checkpoint-N name, or a slot); only uniform needs none")
    if len(set(steps.values())) < len(steps):
        raise UsageError(f"--weights {weighting}: two inputs are of the same step")
    order = sorted(inputs, key=steps.get)
    return dict(zip(order, lawa.merge_weights([steps[p] for p in order], weighting)))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m averaging.offline", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="checkpoints to average (all of one kind)")
    parser.add_argument("--out", required=True, help="where to write the average (must not exist)")
    parser.add_argument("--from-dir", metavar="DIR", help="pick the inputs from DIR's step-named subfolders")
    parser.add_argument("--k", type=int, default=None,
                        help=f"with --from-dir: how many, the latest (default {lawa.LawaArgs.k} unless --window-tokens)")
    parser.add_argument("--window-tokens", type=int, default=None,
                        help="with --from-dir: every checkpoint within this many tokens of the newest, instead of --k")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="with --window-tokens: for folders that do not record their tokens")
    parser.add_argument("--spacing", type=int, default=0,
                        help="with --from-dir: minimum steps between picked checkpoints (0: consecutive)")
    parser.add_argument("--weights", default="uniform", choices=("uniform", *lawa.DECAYS),
                        help="uniform (LAWA), or weighted like that decay, as lawa.merges' weights (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    pickles.add_trust_option(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> str:
    if args.from_dir is not None and args.inputs:
        raise UsageError("give either INPUT paths or --from-dir, not both")
    if args.k is not None and args.window_tokens is not None:
        raise UsageError("give --k or --window-tokens, not both (as a merge takes k or window_tokens)")
    if args.from_dir is None and (args.k is not None or args.window_tokens is not None):
        raise UsageError("--k and --window-tokens pick from --from-dir; with INPUT paths every one is merged")
    if args.from_dir is not None:
        k = args.k if args.k is not None or args.window_tokens is not None else lawa.LawaArgs.k
        for flag, value, least in (("--k", k, 1), ("--spacing", args.spacing, 0),
                                   ("--window-tokens", args.window_tokens, 1), ("--tokens-per-step", args.tokens_per_step, 1)):
            if value is not None and value < least:
                raise UsageError(f"{flag} must be at least {least}, got {value}")
        inputs = pick_from_dir(args.from_dir, k, args.spacing, args.window_tokens, args.tokens_per_step)
    else:
        inputs = list(args.inputs)
    if not inputs:
        raise UsageError("nothing to average: give at least one INPUT or --from-dir")
    inputs = [os.path.normpath(p) for p in inputs]
    kinds = {p: kind_of(p) for p in inputs}
    if len(set(kinds.values())) > 1:
        a = inputs[0]
        b = next(p for p in inputs if kinds[p] != kinds[a])
        raise UsageError(f"inputs of different kinds: {a} is a {kinds[a]}, {b} is a {kinds[b]}")
    if len(set(map(os.path.realpath, inputs))) < len(inputs):
        raise UsageError("an input is given twice: it would weigh double in the average")
    out = os.path.normpath(args.out)
    if os.path.realpath(out) in map(os.path.realpath, inputs):
        raise UsageError(f"--out {out} is one of the inputs")
    if os.path.lexists(out) and not args.force:
        raise UsageError(f"{out} already exists (--force replaces it)")
    kind = kinds[inputs[0]]
    if (kind == "safetensors" and not out.endswith(".safetensors")) or \
            (kind == "torch" and not out.endswith(TORCH_EXTS)):
        raise UsageError(f"--out {out}: the inputs are {kind} files, so OUT must be one too (same extension)")
    weight = input_weights(inputs, args.weights)
    shown = "" if weight is None else " (" + ", ".join(f"{weight[p]:.3f}" for p in weight) + ", oldest first)"
    logger.info(f"merging {len(inputs)} {kind} checkpoint(s) into {out}, weights {args.weights}{shown}")
    average = {"slot": average_slots, "deepspeed": average_deepspeed, "hf": average_hf,
               "safetensors": average_files, "torch": average_files}[kind]
    try:
        with staged(out, replace=args.force) as tmp:
            what = average(inputs, tmp, weight)
    except OutputExists:  # appeared while we worked
        raise UsageError(f"{out} already exists (--force replaces it)") from None
    if kind == "deepspeed":
        latest = os.path.join(os.path.dirname(os.path.abspath(out)), LATEST)
        if not os.path.exists(latest):  # what zero_to_fp32 reads when given no tag
            write_file_atomic(latest, os.path.basename(os.path.abspath(out)))
    return f"wrote {out}: {what}"


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        with pickles.trusting(args.trust_pickle):
            logger.info(run(args))
    except (UsageError, ValueError, slots.SlotError) as e:  # WeightsError, PickleError, ChecksumMismatch: ValueErrors
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # disk full, permissions: not a bug here, and OUT was left untouched
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
