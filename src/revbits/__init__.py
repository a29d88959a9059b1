"""revbits: train deep networks in a fraction of the activation memory, with exact gradients."""

from . import mesa, models
from .bdia import BDIAStack, BlockProtocolError, ReversibilityError, StreamRangeError
from .bdia.fixedpoint import quantize
from .modes import MEMORY_MODES, CheckpointStack, MesaStack, SequentialStack, stack
from .revrnn import RevGRU, RevLSTM, StateRangeError

__all__ = [
    "BDIAStack",
    "BlockProtocolError",
    "CheckpointStack",
    "MEMORY_MODES",
    "MesaStack",
    "ReversibilityError",
    "RevGRU",
    "RevLSTM",
    "SequentialStack",
    "mesa",
    "models",
    "StateRangeError",
    "StreamRangeError",
    "quantize",
    "stack",
]
__version__ = "0.1.0"
