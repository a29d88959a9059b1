"""BDIA under torch.compile: the forward and the backward's recomputation run the same code.

The reversible backward rebuilds x_{k-1} = (x_{k+1} - Q((1 + g) y_k - 2 g x_k)) / g - r 2**-l,
which is exact only if the recomputed y_k is bit-identical to the forward's. Compiled and
eager kernels round differently, and so can two compiled graphs of one block (dynamo compiles an
inference graph under no_grad and a training graph under grad), so two rules keep them equal:

- dynamo stays out of the reversible path (``torch.compiler.disable`` on it): under
  ``torch.compile(model)`` the blocks run eagerly in both passes, and the rest of the model is
  compiled around the stack;
- a block that holds compiled code (``torch.compile(block)``, ``block.compile()``, or a
  compiled submodule) runs in the forward pass under grad, on the inputs its recomputation will
  get (a view of a leaf that requires grad for x and for each tensor argument that wants a
  gradient, :func:`revbits.bdia.tools.graph_inputs`), so both passes call the same compiled
  training graph. Its graph is dropped at once; only the output is kept.

A compiled function called from inside a block cannot be seen from outside; if it makes the
two passes differ, the stack's checksum catches it and raises ReversibilityError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .args import BlockArguments
from .chunks import BatchSplit
from .step import call_block
from .tools import graph_inputs

__all__ = ["forward_arguments", "forward_block", "holds_compiled_code"]


def holds_compiled_code(block: nn.Module) -> bool:
    """Whether ``block`` or one of its submodules was compiled (torch.compile or Module.compile)."""
    return any(_compiled(m) for m in block.modules())


def _compiled(module: nn.Module) -> bool:
    """torch.compile(module) wraps it as ``_orig_mod`` (a submodule); module.compile() sets ``_compiled_call_impl``.
    Read from the module's dicts: a missing attribute through ``nn.Module.__getattr__`` raises, which is slow."""
    attributes = module.__dict__
    wrapped = module._modules.get("_orig_mod", attributes.get("_orig_mod"))
    return isinstance(wrapped, nn.Module) or attributes.get("_compiled_call_impl") is not None


def forward_block(block: nn.Module, index: int, x: torch.Tensor, args: BlockArguments, compiled: bool) -> torch.Tensor:
    """y = block(x, *args, **kwargs) in the reversible forward, run the way the recomputation runs it
    when the block holds compiled code (see the module docstring); returns y without a graph."""
    if not compiled:
        return call_block(block, index, x, args)
    with torch.enable_grad():
        return call_block(block, index, *graph_inputs(x.detach().requires_grad_(), args)).detach()


def forward_arguments(
    block_args: Callable[[Sequence[torch.Tensor]], BlockArguments],
    split: BatchSplit,
    arg_tensors: Sequence[torch.Tensor],
    compiled: bool,
) -> tuple[list[BlockArguments], list[BlockArguments]]:
    """Per batch chunk, the block arguments of the reversible forward (``block_args`` puts the tensor arguments
    in their slots): detached tensors, since nothing there is differentiable (bdia.tools: module trackers), and,
    if any block holds ``compiled`` code, the leaves its recomputation will get, requiring grad where the argument
    does; else the same detached ones."""
    chunks = range(split.chunks)
    detached = [split.tree(block_args([a.detach() for a in arg_tensors]), c) for c in chunks]
    if not compiled:
        return detached, detached
    leaves = [a.detach().requires_grad_(a.requires_grad) for a in arg_tensors]
    return detached, [split.tree(block_args([split.leaf(a, c) for a in leaves]), c) for c in chunks]
