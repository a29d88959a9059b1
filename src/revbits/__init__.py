"""revbits: train deep networks in a fraction of the activation memory, with exact gradients."""

from .bdia import BDIAStack, BlockProtocolError, ReversibilityError, StreamRangeError
from .fixedpoint import quantize
from .stack import MEMORY_MODES, CheckpointStack, SequentialStack, stack

__all__ = [
    "BDIAStack",
    "BlockProtocolError",
    "CheckpointStack",
    "MEMORY_MODES",
    "ReversibilityError",
    "SequentialStack",
    "StreamRangeError",
    "quantize",
    "stack",
]
__version__ = "0.1.0"
