"""The one logger. Rank 0 says everything; other ranks only warnings and errors, tagged with
their rank, so a world of 32 prints one story. Entry points call `setup_logging` once they know
their rank; before that (and in library use) the logger speaks as rank 0."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lawa")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (test capture, redirections), flushed."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(rank: int = 0, prefix: str = "") -> None:
    """Plain-text messages to stdout (torchrun and Slurm collect it per rank)."""
    handler = _Stdout()
    tag = prefix if rank == 0 else f"{prefix}[rank {rank}] "
    handler.setFormatter(logging.Formatter(tag.replace("%", "%%") + "%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


setup_logging()


def rank_span(ranks: list[int]) -> str:
    """'rank 5', 'ranks 2-3' or 'ranks 0, 2, 5': how messages name a set of ranks."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return f"ranks {', '.join(map(str, ranks))}"
