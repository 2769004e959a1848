"""Token data: text sources -> tokenizer -> uint16/uint32 token shards, and deterministic batches.

  sources   what `data.sources` may name, and reading each into text (DataArgs, DataSource)
  prepare   tokenizer, token shards, manifest and fingerprint (`prepare`, `ensure_prepared`)
  batches   training batches and the held-out set (`TokenBatches`)
"""
from launcher.data.batches import Prefetcher, TokenBatches
from launcher.data.prepare import ensure_prepared, load_manifest, prepare, token_dtype
from launcher.data.sources import BUILTIN_PYDOC, BUILTIN_STDLIB, DataArgs, DataSource

__all__ = ["BUILTIN_PYDOC", "Prefetcher", "BUILTIN_STDLIB", "DataArgs", "DataSource", "TokenBatches", "ensure_prepared",
           "load_manifest", "prepare", "token_dtype"]
