"""Prepare a job's data: text sources -> tokenizer -> token shards + manifest.json in data.dir.

    python -m launcher.prepare --job jobs/tiny_cpu.yaml [data.key=value ...]

Training does this by itself when data.dir has no manifest; run it ahead of time for a large corpus
(one process, with progress), or to re-prepare after deleting data.dir.
"""
from __future__ import annotations

import argparse
import json
import sys

from core.config import ConfigError
from core.log import setup_logging
from launcher.config import load_job
from launcher.data import load_manifest, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help="job YAML file (default: jobs/tiny_cpu.yaml)")
    parser.add_argument("--force", action="store_true", help="prepare again even if data.dir has a manifest")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        job = load_job(args.job, args.overrides)
        if load_manifest(job.data.dir) is not None and not args.force:
            print(f"{job.data.dir} is already prepared (use --force to redo it)")
            return 0
        manifest = prepare(job.data, progress=True)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = {s["path"]: {k: s[k] for k in ("train_tokens", "val_tokens") if k in s}
               for s in manifest.get("sources", [])}
    print(f"prepared {job.data.dir}: vocab {manifest['vocab_size']}, {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
