"""Weight averaging (LAWA, EMA, SWA) on tensors and ZeRO-3 shards, the sidecar, and offline tools."""
