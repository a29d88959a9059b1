"""Where the reversible cells' fixed-point chains run as one native operator each.

``revbits/native/revrnn.cpp`` holds the RevGRU's and RevLSTM's chains (the gates' numerators and
fixed-point products, the buffer's multiplication and division, the gate derivatives, the backward's
elementwise part) as C++ operators that give the Python path's results bit for bit
(tests/test_revrnn_native.py compares every one). They run on the CPU for float32 and float64,
outside autograd and compilation (the reversible forward, the reversal and the hand-written backward), with the
buffer's spill decisions on the host and without information tracking; everything else, and any
machine where the kernel cannot be built, takes the Python path.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import native
from .info_buffer import InfoBuffer

_DTYPES = (torch.float32, torch.float64)
use_native = True  # False sends every step through the Python path (tests compare the two)


def native_ops(x: torch.Tensor, buffer: InfoBuffer | None = None) -> Any | None:
    """``torch.ops.revbits_revrnn`` where its operators apply to a step on ``x`` (with ``buffer``), else None."""
    if (
        not use_native
        or torch.is_grad_enabled()
        or torch.compiler.is_compiling()  # dynamo traces the Python path (the operators have no fake kernels)
        or x.device.type != "cpu"
        or x.dtype not in _DTYPES
        or (buffer is not None and (buffer.track_information or not buffer.host_decides))
        or not native.load("revrnn")
    ):
        return None
    return torch.ops.revbits_revrnn


def loaded_ops() -> Any:
    """``torch.ops.revbits_revrnn``, for gates the native operators computed (so loaded by then), whatever the
    switches say now: their backward must read them the way they were written."""
    return torch.ops.revbits_revrnn
