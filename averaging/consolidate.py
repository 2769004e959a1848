"""One full state dict from any slot or DeepSpeed ZeRO-3 checkpoint, tensor parallel or not
(DeepSpeed's zero_to_fp32 per mp rank, merged along the recorded split dimensions:
core.zero_checkpoint).

    python -m averaging.consolidate runs/x/checkpoints/step_00001000 --out model.pt
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from core.zero_checkpoint import consolidate


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m averaging.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
