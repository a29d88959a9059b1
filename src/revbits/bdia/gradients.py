"""The gradients the reversible backward returns besides dL/dx_0, and its per-block recomputation.

For block k and batch chunk c, the backward recomputes y_k = block_k(x_k) from a fresh leaf x_k
(:func:`recompute`), and :class:`Gradients` back-propagates grad_y through it, adding

    dL/dp += J_p^T grad_y     for each tensor p of block k whose gradient the running backward uses
    dL/da += J_a^T grad_y     for each tensor argument a of the stack (its chunk c, or all of it)

over blocks and chunks, and returning J_x^T grad_y for the state. Which tensors those are, and what
happens to the gradients of tensors the forward never saw, is :mod:`revbits.bdia.params`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .args import BlockArguments
from .params import (
    EngineRequest,
    RecomputationError,
    backward_through_block,
    detached_held_tensors,
    reached_leaves,
    recompute_block,
    unmanaged_leaves,
)
from .token_slices import slicing
from .tools import graph_inputs

__all__ = ["Gradients", "recompute", "skip_gradient"]


def recompute(
    state: Any, k: int, x: torch.Tensor, args: BlockArguments, grad_y: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x_k, y_k = block_k(x_k), leaves) with a graph from a fresh leaf x_k, inside the stack's recompute
    context; ``leaves`` maps each held non-leaf tensor of the block to the leaf that stood in for it.
    ``state`` is the forward's :class:`~revbits.bdia.plan.ForwardState`; ``grad_y`` the gradient y_k will
    receive, which a block that runs in layer slices back-propagates slice by slice as it recomputes them
    (:mod:`revbits.bdia.slice_backward`)."""
    config = state.config
    block = config.blocks[k]
    with (
        torch.enable_grad(),
        config.recomputing(k),
        slicing(config.token_slice, checkpoint=True, output_grad=grad_y),
        detached_held_tensors(block, state.block_params[k]) as held,
    ):
        xk = x.detach().requires_grad_()
        return xk, recompute_block(block, k, *graph_inputs(xk, args)), held  # bdia.tools: module trackers


def skip_gradient(
    out: torch.Tensor,
    grad_x_k_plus_2: torch.Tensor | None,
    gamma_k_plus_1: torch.Tensor | None,
    grad_x_k_plus_1: torch.Tensor,
    gamma_k: torch.Tensor | None,
) -> None:
    """The part of dL/dx_k that bypasses block k, for one batch chunk (every argument is that chunk's), written
    into ``out``:

        g_{k+1} dL/dx_{k+2} - 2 g_k dL/dx_{k+1}     (the first term is absent for k = K-1, the second for k = 0)

    ``out`` may be ``grad_x_k_plus_2`` itself: it is read before it is written.
    """
    if grad_x_k_plus_2 is None:
        assert gamma_k is not None
        torch.mul(grad_x_k_plus_1, -2 * gamma_k, out=out)
        return
    assert gamma_k_plus_1 is not None
    torch.mul(grad_x_k_plus_2, gamma_k_plus_1, out=out)
    if gamma_k is not None:
        out.addcmul_(grad_x_k_plus_1, gamma_k, value=-2)


def _accumulate(store: list[torch.Tensor | None], slots: Sequence[int], grads: Sequence[torch.Tensor | None]) -> None:
    for slot, grad in zip(slots, grads):
        if grad is not None:
            store[slot] = grad if store[slot] is None else store[slot] + grad


def _name(block: nn.Module, k: int) -> str:
    return f"block {k} ({type(block).__name__})"


class Gradients:
    """dL/d(tensor arguments) and dL/d(parameters and held tensors) of one backward, summed over blocks and
    chunks, for the reversible Function to return."""

    def __init__(self, state: Any, arg_inputs: list[torch.Tensor], request: EngineRequest) -> None:
        self.state, self.arg_inputs, self.request = state, arg_inputs, request
        # the Function's tensor inputs are x_0, the tensor arguments, the parameters and the probe
        self.wanted_slots = [i for i, a in enumerate(arg_inputs) if a.requires_grad and request.wants(1 + i)]
        self.first_param = 1 + len(arg_inputs)
        self.params: list[torch.Tensor | None] = [None] * state.num_params
        self.args: list[torch.Tensor | None] = [None] * len(arg_inputs)
        self.foreign_users: dict[int, list[int]] = {}  # id of a foreign leaf -> the blocks that reached it
        self.warned = False

    def through_block(
        self,
        k: int,
        c: int,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        xk: torch.Tensor,
        leaves: list[torch.Tensor],
        held: dict[int, torch.Tensor],
    ) -> torch.Tensor | None:
        """Back-propagate grad_y through chunk c of block k's recomputed y: add the gradients of the block's
        tensors (those the running backward uses) and of the arguments, and return dL/dx_k through the
        block. ``leaves`` are the chunk's argument leaves; ``held`` maps held non-leaf tensors to the
        leaves that stood in for them."""
        state = self.state
        tensors, index = state.block_params[k], state.param_index[k]
        wants = self.request.wants
        live = [i for i, p in enumerate(tensors) if p.requires_grad and wants(self.first_param + index[i])]
        stand_ins = [i for i in live if id(tensors[i]) in held]
        direct = [i for i in live if id(tensors[i]) not in held]
        wanted = [leaves[i] for i in self.wanted_slots]
        try:
            grads = backward_through_block(
                y,
                grad_y,
                [xk, *wanted, *(held[id(tensors[i])] for i in stand_ins)],
                [tensors[i] for i in direct],
                self.request,
                _name(state.config.blocks[k], k),
            )
        except RuntimeError as e:
            if "backward through the graph a second time" not in str(e):
                raise
            raise self._walked_twice(k, y) from e
        self._note_foreign(k, grads.foreign)
        _accumulate(self.params, [index[i] for i in direct], grads.params)
        _accumulate(self.params, [index[i] for i in stand_ins], grads.inputs[1 + len(wanted) :])
        for slot, grad in zip(self.wanted_slots, grads.inputs[1:]):
            state.split.add_grad(self.args, slot, self.arg_inputs[slot], grad, c)
        return grads.inputs[0]

    def _note_foreign(self, k: int, foreign: list[torch.Tensor]) -> None:
        """Remember which blocks reached which foreign leaves, and warn once about a leaf that no wrapper
        manages: only ``loss.backward()`` can give it its gradient."""
        for t in foreign:
            users = self.foreign_users.setdefault(id(t), [])
            if k not in users:
                users.append(k)
        block = self.state.config.blocks[k]
        unseen = [] if self.warned else unmanaged_leaves(block, foreign)
        if unseen:  # once per backward, and Python's warning filter shows the same text once
            self.warned = True
            warnings.warn(
                f"{_name(block, k)} uses a tensor of shape {list(unseen[0].shape)} requiring grad that is neither "
                "its parameter, an attribute of it nor an argument of the stack (a closure, or a module outside its "
                "module tree): loss.backward() gives it its gradient, but torch.autograd.grad and "
                "backward(inputs=) cannot see it; hold it as an attribute of the block (block.name = tensor)",
                stacklevel=2,
            )

    def _walked_twice(self, k: int, y: torch.Tensor) -> RecomputationError:
        """The error for a graph built outside the stack that the backward walked a second time."""
        reached = {id(t) for t in reached_leaves(y)}
        others = sorted({j for i, users in self.foreign_users.items() if i in reached for j in users} - {k})
        with_whom = f"blocks {', '.join(map(str, others))}" if others else "another batch chunk of the block"
        block = _name(self.state.config.blocks[k], k)
        return RecomputationError(
            f"{block} and {with_whom} use a tensor computed with a graph outside the stack "
            "(a non-leaf requiring grad) that the blocks do not hold as attributes, so each block's backward "
            "walks that graph and the second walk finds it freed; hold it as an attribute of the blocks "
            "(block.name = tensor), which the stack back-propagates once, or pass it to the stack as an argument"
        )
