"""BDIA under PyTorch's own tools: the profiler, the ModTracker-based tools, torch.distributed.pipelining.

- torch.profiler: each phase of a reversible step runs in a named region while a profiler is on (and
  in no region otherwise, at no cost): :data:`FORWARD` around the stack's reversible forward,
  :data:`RECOMPUTE` around each recomputation of a block in the backward (once per batch chunk),
  :data:`INVERSE` around each exact inverse x_{k-1} = (x_{k+1} - u) / g - r 2**-l.
- Module trackers (``torch.distributed._tools.mod_tracker.ModTracker``, used by ``MemTracker``, and
  ``torch.utils.module_tracker.ModuleTracker``, used by ``FlopCounterMode``): their forward pre-hook
  registers a gradient hook on every input of a module that requires grad. Two things broke it:
  (1) the reversible forward runs the blocks inside an autograd Function, where nothing is
  differentiable, and a view made there of a tensor that requires grad has no gradient function, so
  the hook could not be registered; the forward now hands the blocks detached tensors. (2) The
  recomputation differentiates each block with ``torch.autograd.grad`` from fresh leaves, and a
  gradient hook on a leaf makes that call fail ("A leaf node was passed to _will_engine_execute_node");
  the blocks now get a view of each leaf (:func:`graph_inputs`), the same in the forward of a compiled
  block, so that both passes still call one compiled graph.
- torch.distributed.pipelining: a ``PipelineStage`` built without example inputs infers its shapes
  by running the stage forward and backward once, on the first micro-batch at stage 0 and on
  uninitialised tensors (``torch.empty``) at every later stage. Such values leave the range where the
  grid is exact, and the reversible step raised ``StreamRangeError``. During that inference
  (:func:`pipelining_shape_inference`), and for tensors on the meta device, which hold no values, the
  stack computes its evaluation function (g = 0) under plain autograd: the shapes, dtypes and
  ``requires_grad`` of its output and of the input gradients are training's, and it draws no random
  signs and stores nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from .args import BlockArguments

__all__ = [
    "FORWARD",
    "INVERSE",
    "RECOMPUTE",
    "graph_inputs",
    "has_no_values",
    "pipelining_shape_inference",
    "profiled",
]

FORWARD = "revbits.bdia.forward"
RECOMPUTE = "revbits.bdia.recompute"
INVERSE = "revbits.bdia.inverse"

#: The methods of torch.distributed.pipelining's PipelineStage that infer shapes by running the stage
#: (torch >= 2.9, and torch 2.4 - 2.8).
_SHAPE_INFERENCE = frozenset({"_forward_metadata_inference", "_backward_metadata_inference", "_shape_inference"})
_PIPELINING_STAGE = os.path.join("pipelining", "stage.py")


def profiled(name: str) -> contextlib.AbstractContextManager:
    """``torch.profiler.record_function(name)`` while a profiler is on, else no context."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def pipelining_shape_inference() -> bool:
    """Whether this call comes from the shape inference of a torch.distributed.pipelining stage."""
    if torch.compiler.is_compiling():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name in _SHAPE_INFERENCE and code.co_filename.endswith(_PIPELINING_STAGE):
            return True
        frame = frame.f_back
    return False


def has_no_values(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on the meta device: it has a shape and a dtype but no values."""
    return x.device.type == "meta"


def graph_inputs(x: torch.Tensor, args: BlockArguments | Sequence[Any]) -> tuple[torch.Tensor, Any]:
    """``x`` and the top-level tensor arguments, each leaf that requires grad replaced by a view of itself
    (same values, same version counter; gradients reach the leaf through the view)."""

    def alias(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf:
            return t.view_as(t)
        return t

    if isinstance(args, BlockArguments):
        return alias(x), args.with_values([alias(v) for v in args.values()])
    return alias(x), [alias(v) for v in args]
