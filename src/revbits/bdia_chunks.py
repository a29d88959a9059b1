"""Deprecated: moved to :mod:`revbits.bdia.chunks`; this alias goes in 0.3."""

from .bdia.chunks import (
    AUTO,
    AUTO_MAX_CHUNKS,
    AUTO_MIN_CHUNK_NUMEL,
    BatchSplit,
    check_batch_chunks,
    plan_split,
)

__all__ = ["AUTO", "AUTO_MAX_CHUNKS", "AUTO_MIN_CHUNK_NUMEL", "BatchSplit", "check_batch_chunks", "plan_split"]
