"""Which tensors take part in a block's recomputation, and how their gradients reach them.

BDIA's backward runs each block again with a graph, y = block(x, *args), and back-propagates
g_y through it. Plain autograd would give every leaf tensor that this graph reaches its share
J^T g_y, and nothing to the tensors it does not reach. The reversible backward keeps that rule
exactly, whatever the parameters are by then:

- the leaves that the forward pass handed to the reversible Function (the blocks' trainable
  parameters at forward time) get their gradients returned by the Function, so hooks, DDP and
  ``torch.autograd.grad(loss, params)`` see an ordinary autograd input;
- a leaf the forward never saw -- a wrapper swapped the parameters in between, as FSDP's unshard
  does, or FSDP1's flat parameter stands behind views -- gets its gradient accumulated into
  ``.grad`` by the autograd engine, as ``loss.backward()`` would, with the wrapper's own hooks
  (FSDP's reduce-scatter) firing on the way;
- a parameter the recomputation does not reach gets None, as under plain autograd.

Nothing is matched by name or shape; the graph of the recomputation decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .step import call_block

__all__ = [
    "BlockGradients",
    "RecomputationError",
    "backward_through_block",
    "block_parameters",
    "recompute_block",
    "reached_leaves",
    "sharded_block",
    "trainable_parameters",
]


def _returnable(p: nn.Parameter) -> bool:
    """A trainable parameter whose gradient the reversible Function can return. FSDP1's flat
    parameter is not one: it changes shape between forward (sharded) and backward (unsharded), so
    it is left to the engine, which finds it behind the views the recomputation uses."""
    return p.requires_grad and not getattr(p, "_is_flat_param", False)


def trainable_parameters(blocks: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The returnable trainable parameters of all blocks, each once even when blocks share it."""
    seen: dict[int, nn.Parameter] = {}
    for block in blocks:
        for p in block.parameters():
            if _returnable(p):
                seen.setdefault(id(p), p)
    return list(seen.values())


def block_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The returnable trainable parameters of one block, in ``block.parameters()`` order."""
    return [p for p in block.parameters() if _returnable(p)]


def reached_leaves(y: torch.Tensor) -> list[torch.Tensor]:
    """Every leaf tensor whose gradient ``y.backward()`` would accumulate: the AccumulateGrad
    nodes reachable from ``y.grad_fn``, in no particular order."""
    if y.grad_fn is None:
        return [y] if y.requires_grad else []
    leaves: list[torch.Tensor] = []
    seen: set[int] = set()
    todo = [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes hold one
        if variable is not None:
            leaves.append(variable)
        else:
            todo.extend(fn for fn, _ in node.next_functions)
    return leaves


class BlockGradients:
    """The gradients of one recomputed block: ``inputs[i]`` for each input, ``params[j]`` for each
    forward-time parameter (None where it was not reached or was handled by the engine)."""

    __slots__ = ("inputs", "params")

    def __init__(self, inputs: list[torch.Tensor | None], params: list[torch.Tensor | None]) -> None:
        self.inputs, self.params = inputs, params


def backward_through_block(
    y: torch.Tensor,
    grad_y: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
) -> BlockGradients:
    """J^T grad_y for the recomputed block output ``y``, by the rule of the module docstring.

    ``inputs`` are the fresh leaves the recomputation started from (the state x_k and the
    block arguments that want a gradient); ``params`` the block's trainable parameters at forward
    time. Returns the gradients of both; a leaf that is neither gets its gradient in ``.grad``.
    """
    leaves = reached_leaves(y)
    reached = {id(t) for t in leaves}
    known = reached & ({id(t) for t in inputs} | {id(p) for p in params})
    foreign = [t for t in leaves if id(t) not in known]
    used = [j for j, p in enumerate(params) if id(p) in reached]
    param_grads: list[torch.Tensor | None] = [None] * len(params)
    if not foreign:
        grads = torch.autograd.grad(y, [*inputs, *(params[j] for j in used)], grad_y, allow_unused=True)
        for j, grad in zip(used, grads[len(inputs) :]):
            param_grads[j] = grad
        return BlockGradients(list(grads[: len(inputs)]), param_grads)
    # A wrapper stands between the forward-time parameters and the recomputation (FSDP): every
    # reached leaf gets its gradient the way loss.backward() gives it, accumulated by the engine.
    for t in inputs:
        t.grad = None
    torch.autograd.backward(y, grad_y, inputs=[*inputs, *(params[j] for j in used), *foreign])
    input_grads = [t.grad for t in inputs]
    for t in inputs:
        t.grad = None
    return BlockGradients(input_grads, param_grads)


def sharded_block(blocks: Sequence[nn.Module]) -> str | None:
    """Why the blocks cannot be run in batch chunks, if one of them is (or holds) its own FSDP unit.

    FSDP reduce-scatters a unit's gradients once per backward, when the unit's backward ends; a block
    recomputed and back-propagated chunk by chunk ends it once per chunk, and the later chunks' gradients
    would never be reduced. FSDP around the stack or the whole model keeps every block unsharded through
    the stack's backward, so chunks are fine there.
    """
    for k, block in enumerate(blocks):
        for name, module in block.named_modules():
            kinds = {c.__name__ for c in type(module).__mro__}
            if kinds & {"FSDPModule", "FullyShardedDataParallel"}:
                where = f"{name!r} in block {k}" if name else f"block {k}"
                return f"{where} is its own FSDP unit"
    return None


class RecomputationError(RuntimeError):
    """A block that ran in the forward pass failed when the backward ran it again."""


def recompute_block(block: nn.Module, index: int, x: torch.Tensor, args: Any) -> torch.Tensor:
    """y = block(x, *args) in the backward's recomputation; a RuntimeError there, after the same call
    succeeded in the forward, almost always means the block's parameters changed in between, and the
    error says so (a RecomputationError chained to the original)."""
    try:
        return call_block(block, index, x, args)
    except RuntimeError as e:
        raise RecomputationError(
            f"block {index} ({type(block).__name__}) ran in the forward pass but failed when the backward "
            f"recomputed it: {e}. The likely cause is a wrapper that resharded or replaced its parameters "
            "after the forward, such as FSDP1 with the block's parameters in an outer unit: wrap each block "
            "in its own FSDP unit (auto_wrap_policy), or use FSDP2's fully_shard"
        ) from e
