"""One full state dict from any slot or DeepSpeed ZeRO-3 checkpoint, tensor parallel or not.

DeepSpeed's `zero_to_fp32` consolidates the data-parallel partitions of one tensor-parallel rank
at a time; the mp_rank_XX state dicts are then merged along the dimension each parameter was split
on, which the launcher records (`tensor_parallel_layout`: {name: [dim, stride]}) in every snapshot
manifest, checkpoint `run_state.json` and model-states file — DeepSpeed itself does not record it.

    python -m averaging.consolidate runs/x/checkpoints/step_00001000 --out model.pt
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import re
import sys
import tempfile
from typing import Optional

import torch

from models.tensor_parallel import merge_tensors

_MP_RANK = re.compile(r"_mp_rank_(\d+)_(model|optim)_states\.pt$")


def _files_by_mp_rank(folder: str) -> dict[int, list[str]]:
    by_rank: dict[int, list[str]] = {}
    for path in glob.glob(os.path.join(folder, "*_states.pt")):
        match = _MP_RANK.search(os.path.basename(path))
        if match:
            by_rank.setdefault(int(match.group(1)), []).append(path)
    if not by_rank:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed *_model_states.pt / *_optim_states.pt files")
    return by_rank


def tensor_parallel_layout_of(folder: str) -> Optional[dict[str, list[int]]]:
    """The recorded split dimensions: from a slot manifest, a checkpoint's run_state.json, or the
    model-states file of mp rank 0."""
    for name in ("manifest.json", "run_state.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                layout = json.load(f).get("tensor_parallel_layout")
            if layout is not None:
                return layout
    states = sorted(glob.glob(os.path.join(folder, "*mp_rank_00_model_states.pt")))
    if states:
        return torch.load(states[0], map_location="cpu", weights_only=False).get("tensor_parallel_layout")
    return None


def _zero_to_fp32(folder: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
        return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))


def consolidate(folder: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a slot or ZeRO-3 checkpoint tag folder."""
    folder = os.path.abspath(folder)
    by_rank = _files_by_mp_rank(folder)
    if sorted(by_rank) == [0]:
        return _zero_to_fp32(folder)
    layout = tensor_parallel_layout_of(folder)
    if layout is None:
        raise ValueError(f"{folder} has {len(by_rank)} tensor-parallel ranks but records no tensor_parallel_layout: "
                         "cannot tell which dimension each parameter was split on")
    per_rank = []
    for tp_rank in sorted(by_rank):
        # zero_to_fp32 reads every *_states.pt in a folder: show it one mp rank's files at a time.
        with tempfile.TemporaryDirectory() as tmp:
            view = os.path.join(tmp, os.path.basename(folder))
            os.makedirs(view)
            for path in by_rank[tp_rank]:
                name = _MP_RANK.sub(lambda m: f"_mp_rank_00_{m.group(2)}_states.pt", os.path.basename(path))
                os.symlink(path, os.path.join(view, name))
            per_rank.append(_zero_to_fp32(view))
    return {name: merge_tensors([sd[name] for sd in per_rank], *layout[name]) if name in layout else per_rank[0][name]
            for name in per_rank[0]}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a slot (step_XXXXXXXX with manifest.json) or a checkpoint tag folder")
    parser.add_argument("--out", required=True, help="where to torch.save the state dict")
    args = parser.parse_args(argv)
    try:
        state_dict = consolidate(args.folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.save(state_dict, args.out)
    print(f"wrote {args.out}: {len(state_dict)} tensors, {sum(t.numel() for t in state_dict.values()) / 1e6:.2f}M values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
