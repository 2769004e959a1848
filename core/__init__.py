"""The bottom layer: what `models`, `averaging` and `launcher` all use, importing none of them.

Process groups and rank discovery, the DeepSpeed engine builder, the job-config loader, the
tokenizer, DeepSpeed's ZeRO-3 checkpoint files, a lazy weights reader, file IO (one atomic write,
one JSONL reader, step-folder names), the names of every file in a run directory, and the logger.
"""
