"""Deprecated: moved to :mod:`revbits.bdia.bits` (and ``InfoBuffer`` to :mod:`revbits.revrnn.info_buffer`);
this alias goes in 0.3."""

from .bdia.bits import PackedBits, pack_bits, unpack_bits
from .revrnn.info_buffer import InfoBuffer

__all__ = ["InfoBuffer", "PackedBits", "pack_bits", "unpack_bits"]
