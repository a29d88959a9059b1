"""Deprecated: moved to revbits.train.lr_schedule; this alias goes in 0.3."""

from .lr_schedule import lr_factor

__all__ = ["lr_factor"]
