"""DeepSpeed as this project meets it, in one place: imported for a device (its accelerator chosen,
not guessed, and its per-step noise silenced). The process-group setup and the engine builder both
import it from here, and an upgrade of DeepSpeed starts here."""
from __future__ import annotations

import logging
import os
import warnings


def use_deepspeed(device_type: str):
    """DeepSpeed, imported for this device: its CPU accelerator chosen rather than guessed (with
    a warning), its per-step logging and the deprecation warnings of its collectives silenced."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives that newer torch marks deprecated, once per step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    return deepspeed


def use_deepspeed_here():
    """DeepSpeed for whatever this process runs on (a tool that reads its files, not a rank)."""
    import torch

    return use_deepspeed("cuda" if torch.cuda.is_available() else "cpu")
