"""Which saved tensors stay exact, and the torch function that saved each one.

A tensor autograd saves is kept as it is when it is
- not floating point (integer indices, bool masks): ``"integer"``;
- not a dense tensor with storage (sparse, nested, meta): ``"layout"``;
- smaller than the size threshold: ``"small"``;
- a parameter, a view of one, or its cast under autocast: ``"parameter"``;
- a leaf that requires grad (an input of the caller's, which holds it anyway): ``"leaf"``;
- a statistic: a tensor without autograd history that is smaller than the first tensor argument
  of the op saving it (LayerNorm mean and rstd, attention log-sum-exp, a broadcast mask):
  ``"statistic"``.
Everything else is an activation and gets 8-bit codes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# autograd nodes that only view or cast their single input: walking through them from a saved
# tensor and reaching a leaf's AccumulateGrad means the tensor is a parameter in disguise
_VIEW_OR_CAST_NODES = frozenset(
    {
        "AliasBackward0",
        "AsStridedBackward0",
        "ExpandBackward0",
        "PermuteBackward0",
        "ReshapeAliasBackward0",
        "SelectBackward0",
        "SliceBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "TBackward0",
        "ToCopyBackward0",
        "TransposeBackward0",
        "UnbindBackward0",
        "UnsafeViewBackward0",
        "UnsqueezeBackward0",
        "ViewBackward0",
    }
)
_ATTENTION_WORDS = ("attention", "softmax", "matmul", "bmm", "baddbmm")


@dataclass
class OpCall:
    """The torch function being run: its name and what its arguments say about saved tensors."""

    name: str
    first_numel: int = 0
    parameter_storages: set[int] = field(default_factory=set)
    parameter_shapes: set[tuple[int, ...]] = field(default_factory=set)

    @property
    def attention(self) -> bool:
        return any(word in self.name for word in _ATTENTION_WORDS)


UNKNOWN_OP = OpCall("other")


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return name.strip("_") or "other"


def describe_call(func: Any, args: tuple, kwargs: dict | None) -> OpCall:
    """An :class:`OpCall` for ``func(*args, **kwargs)``."""
    call = OpCall(_function_name(func))
    for value in tree_leaves((args, kwargs or {})):
        if not isinstance(value, torch.Tensor):
            continue
        if not call.first_numel:
            call.first_numel = value.numel()
        if isinstance(value, torch.nn.Parameter):
            call.parameter_shapes.add(tuple(value.shape))
            call.parameter_shapes.add(tuple(reversed(value.shape)))
        if isinstance(value, torch.nn.Parameter) or (value.is_leaf and value.requires_grad):
            call.parameter_storages.add(value.untyped_storage().data_ptr())
    return call


class OpTracker(TorchFunctionMode):
    """Remembers the outermost torch function being run, so a saved-tensor hook can tell
    which op saved a tensor (``F.linear``, ``F.layer_norm``, ``F.scaled_dot_product_attention``)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = UNKNOWN_OP

    def __torch_function__(self, func, types, args=(), kwargs=None):
        outer, self.current = self.current, describe_call(func, args, kwargs)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.current = outer


def _reaches_leaf_through_views(tensor: torch.Tensor, depth: int = 6) -> bool:
    node = tensor.grad_fn
    for _ in range(depth):
        if node is None or node.name() not in _VIEW_OR_CAST_NODES:
            return node is not None and node.name() == "torch::autograd::AccumulateGrad"
        parents = [parent for parent, _ in node.next_functions if parent is not None]
        if len(parents) != 1:
            return False
        node = parents[0]
    return node is not None and node.name() == "torch::autograd::AccumulateGrad"


def exact_reason(tensor: torch.Tensor, call: OpCall, min_numel: int) -> str | None:
    """Why ``tensor`` must be saved exactly, or None when it is an activation to compress."""
    if not tensor.is_floating_point():
        return "integer"
    if tensor.layout != torch.strided or tensor.device.type == "meta":
        return "layout"  # sparse, nested or meta tensors are kept as they are
    if tensor.numel() < min_numel:
        return "small"
    if tensor.grad_fn is None:
        if isinstance(tensor, torch.nn.Parameter):
            return "parameter"
        if tensor.requires_grad:
            return "leaf"  # an input that wants a gradient: its owner keeps it alive anyway
        if tensor.untyped_storage().data_ptr() in call.parameter_storages:
            return "parameter"
        if tuple(tensor.shape) in call.parameter_shapes:
            return "parameter"  # the autocast cast of a frozen parameter has no history
        if tensor.numel() < call.first_numel:
            return "statistic"
        return None
    if tensor.untyped_storage().data_ptr() in call.parameter_storages or _reaches_leaf_through_views(tensor):
        return "parameter"
    return None
