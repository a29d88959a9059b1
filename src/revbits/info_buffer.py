"""Deprecated: moved to :mod:`revbits.revrnn.info_buffer`; this alias goes in 0.3."""

from .revrnn.info_buffer import (
    InfoBuffer,
)

__all__ = ["InfoBuffer"]
