"""Deprecated: moved to revbits.train.tasks.hf; this alias goes in 0.3."""

from .tasks.hf import (
    CAUSAL_TYPES,
    MASK_FRACTION,
    OFFSET_POSITIONS,
    PACKAGED,
    HFTextTask,
    mask_tokens,
    resolve_model_path,
)

__all__ = [
    "CAUSAL_TYPES",
    "MASK_FRACTION",
    "OFFSET_POSITIONS",
    "PACKAGED",
    "HFTextTask",
    "mask_tokens",
    "resolve_model_path",
]
