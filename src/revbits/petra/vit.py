"""Deprecated: moved to :mod:`revbits.petra.vit_pieces`; this alias goes in 0.3."""

from .vit_pieces import ViTHead, ViTStem, vit_pieces

__all__ = ["ViTHead", "ViTStem", "vit_pieces"]
