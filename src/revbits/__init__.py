"""revbits: train deep networks in a fraction of the activation memory, with exact gradients.

The public names below are imported on first use (PEP 562), so ``import revbits`` and the command
line's ``revbits --help`` do not load torch; ``revbits.BDIAStack`` or ``from revbits import stack``
imports the module that defines the name, as an eager import would.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names resolve to, for type checkers and readers
    from . import mesa, models
    from .bdia import BDIAStack, BlockProtocolError, StreamRangeError
    from .bdia.fixedpoint import quantize
    from .errors import ReversibilityError
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

# public name -> the module that defines it ("" for a submodule exported under its own name)
_HOMES = {
    "BDIAStack": ".bdia",
    "BlockProtocolError": ".bdia",
    "ReversibilityError": ".errors",
    "StreamRangeError": ".bdia",
    "quantize": ".bdia.fixedpoint",
    "RevGRU": ".revrnn",
    "RevLSTM": ".revrnn",
    "StateRangeError": ".revrnn",
    "MEMORY_MODES": ".modes",
    "CheckpointStack": ".modes",
    "MesaStack": ".modes",
    "SequentialStack": ".modes",
    "stack": ".modes",
    "mesa": "",
    "models": "",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'revbits' has no attribute {name!r}")
    if not home:
        return importlib.import_module(f".{name}", __name__)
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

