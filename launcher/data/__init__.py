"""Token data: text sources -> tokenizer -> uint16/uint32 token shards, and deterministic batches.

  sources   what `data.sources` may name, and reading each into text (DataArgs, DataSource)
  prepare   tokenizer, token shards, manifest and fingerprint (`prepare`, `ensure_prepared`)
  batches   training batches and each source's held-out set (`TokenBatches`)
  mixture   the sources' sampling weights: as given, natural, or entropy-driven (BiMix)
"""
from launcher.data.batches import Prefetcher, TokenBatches, job_batches
from launcher.data.mixture import describe as describe_mixture
from launcher.data.mixture import mixture_weights
from launcher.data.prepare import ensure_prepared, load_manifest, prepare, token_dtype
from launcher.data.sources import BUILTIN_PYDOC, BUILTIN_STDLIB, DataArgs, DataSource

__all__ = ["BUILTIN_PYDOC", "Prefetcher", "BUILTIN_STDLIB", "DataArgs", "DataSource", "TokenBatches", "describe_mixture",
           "ensure_prepared", "job_batches", "load_manifest", "mixture_weights", "prepare", "token_dtype"]
