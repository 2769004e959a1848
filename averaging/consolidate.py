"""One full model from any slot or DeepSpeed ZeRO-3 checkpoint, tensor parallel or not, written
tensor by tensor: safetensors (shards of at most --max-shard-gb, with an index like transformers'
big models) in a folder, under our parameter names; or, for small models, one torch.save'd state
dict when --out ends in .pt (that path holds the whole model in memory).

    python -m averaging.consolidate runs/x/checkpoints/step_00001000 --out model/
    python -m averaging.consolidate runs/x/lawa_best/step_00002000 --out model.pt
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from core import pickles
from core.files import staged
from core.weights import MAX_SHARD_BYTES, write_safetensors
from core.zero_folder import ZeroFolder


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m averaging.consolidate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a slot (step_XXXXXXXX with manifest.json) or a checkpoint tag folder")
    parser.add_argument("--out", required=True, help="a folder for safetensors files, or a .pt file")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9,
                        help="largest safetensors file (default %(default)s)")
    pickles.add_trust_option(parser)
    args = parser.parse_args(argv)
    try:
        with pickles.trusting(args.trust_pickle):
            source = ZeroFolder(args.folder)
            values = sum(source.shape(name).numel() for name in source.names()) / 1e6
            if args.out.endswith(".pt"):
                torch.save(source.state_dict(), args.out)
                print(f"wrote {args.out}: {len(source.names())} tensors, {values:.2f}M values")
                return 0
            with staged(args.out) as tmp:
                os.makedirs(tmp)
                files = write_safetensors(source, tmp, torch.float32, int(args.max_shard_gb * 1e9))
    except (FileNotFoundError, ValueError) as e:  # unreadable, unsafe or not matching its checksums: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(source.names())} tensors, {values:.2f}M values, in {len(files)} safetensors "
          f"file{'s' if len(files) > 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
