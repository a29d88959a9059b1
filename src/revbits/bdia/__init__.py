"""BDIA: exact bit-level reversible training of a stack of same-shape residual blocks.

- :mod:`~revbits.bdia.stack`: :class:`BDIAStack`; :mod:`~revbits.bdia.function`: its autograd Function (forward
  without a graph, backward that rebuilds every state); :mod:`~revbits.bdia.plan`: the stack's frozen configuration
  and the state one forward saves for its backward;
- :mod:`~revbits.bdia.step`: one BDIA step and its exact inverse, shared with PETRA's BDIA stages;
- :mod:`~revbits.bdia.fixedpoint`: the grid Q and its exact range; :mod:`~revbits.bdia.bits`: packed bit planes;
- :mod:`~revbits.bdia.args`, :mod:`~revbits.bdia.chunks`, :mod:`~revbits.bdia.params`, :mod:`~revbits.bdia.compile`:
  the block arguments, batch chunks, gradient routing and torch.compile rules of the reversible backward;
  :mod:`~revbits.bdia.options`: ``check_options``, the checks of the stack's numeric options;
  :mod:`~revbits.bdia.gradients`: the backward's per-block recomputation and the gradients it sums;
- :mod:`~revbits.bdia.token_slices`: token-wise submodules (MLPs) run in slices of the sequence in training;
- :mod:`~revbits.bdia.tools`: what the stack does for PyTorch's profiler, module trackers (FlopCounterMode,
  MemTracker) and torch.distributed.pipelining's shape inference.
"""

from .bits import PackedBits, pack_bits, unpack_bits
from .fixedpoint import exact_limit, quantize
from .options import check_options
from .params import RecomputationError
from .stack import BDIAStack, RecomputeContext, ReversibilityError
from .step import BlockProtocolError, Step, StreamRangeError

__all__ = [
    "BDIAStack",
    "BlockProtocolError",
    "PackedBits",
    "RecomputationError",
    "RecomputeContext",
    "ReversibilityError",
    "Step",
    "StreamRangeError",
    "check_options",
    "exact_limit",
    "pack_bits",
    "quantize",
    "unpack_bits",
]
