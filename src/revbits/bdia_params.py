"""Deprecated: moved to :mod:`revbits.bdia.params`; this alias goes in 0.3."""

from .bdia.params import (
    BlockGradients,
    RecomputationError,
    backward_through_block,
    block_parameters,
    reached_leaves,
    recompute_block,
    sharded_block,
    trainable_parameters,
)

__all__ = [
    "BlockGradients",
    "RecomputationError",
    "backward_through_block",
    "block_parameters",
    "recompute_block",
    "reached_leaves",
    "sharded_block",
    "trainable_parameters",
]
