"""Deprecated: moved to :mod:`revbits.bdia.args`; this alias goes in 0.3."""

from .bdia.args import (
    BlockArguments,
)

__all__ = ["BlockArguments"]
