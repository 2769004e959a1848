"""Token data: sources -> token ids in a prepared data dir -> deterministic batches.

  sources    what `data.sources` may name, and where each is found (DataArgs, DataSource)
  text       plain text read as documents, in byte ranges of whole documents
  units      preparation's units of work, tokenized (or checked) by worker processes
  tokenized  corpora tokenized elsewhere: nanoGPT flat files, Megatron indexed datasets
  split      where each source's held-out split begins
  preparation the tokenizer, the units, the manifest and its fingerprint (`prepare`, `ensure_prepared`)
  batches    training batches and each source's held-out set (`TokenBatches`)
  mixture    the sources' sampling weights: as given, natural, or entropy-driven (BiMix)

Names are imported on first use, so that preparation's worker processes load neither torch nor
`datasets` unless they need them.
"""
import importlib

_WHERE = {
    "Prefetcher": "batches", "TokenBatches": "batches", "job_batches": "batches",
    "describe_mixture": ("mixture", "describe"), "mixture_weights": "mixture",
    "ensure_prepared": "preparation", "load_manifest": "preparation", "prepare": "preparation",
    "prepared": "preparation",
    "token_dtype": "preparation",
    "BUILTIN_PYDOC": "sources", "BUILTIN_STDLIB": "sources", "DataArgs": "sources", "DataSource": "sources",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'launcher.data' has no attribute {name!r}")
    module, attribute = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(f"launcher.data.{module}"), attribute)
