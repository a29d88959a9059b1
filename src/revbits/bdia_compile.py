"""Deprecated: moved to :mod:`revbits.bdia.compile`; this alias goes in 0.3."""

from .bdia.compile import (
    forward_block,
    holds_compiled_code,
)

__all__ = ["forward_block", "holds_compiled_code"]
