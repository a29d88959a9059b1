"""Deprecated: moved to :mod:`revbits.bdia.fixedpoint`; this alias goes in 0.3."""

from .bdia.fixedpoint import (
    SIGNIFICAND_BITS,
    exact_limit,
    grid_codes,
    quantize,
)

__all__ = ["SIGNIFICAND_BITS", "exact_limit", "grid_codes", "quantize"]
