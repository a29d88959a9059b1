"""Deprecated: moved to :mod:`revbits.bdia.step`; this alias goes in 0.3."""

from .bdia.step import (
    BlockProtocolError,
    StreamRangeError,
    call_block,
    combine,
    forward_step,
    forward_step_,
    gamma_exponent,
    inverse_step_,
    raise_if_out_of_range,
    residue,
    state_checksum,
    stream_max,
)

__all__ = [
    "BlockProtocolError",
    "StreamRangeError",
    "call_block",
    "combine",
    "forward_step",
    "forward_step_",
    "gamma_exponent",
    "inverse_step_",
    "raise_if_out_of_range",
    "residue",
    "state_checksum",
    "stream_max",
]
