"""Each slice back-propagated as soon as BDIA's backward has recomputed it: two forwards of a sliced layer, not three.

In BDIA's backward the gradient of block k's output is known before the block is recomputed:

    dL/dy_k = (1 + g_k) dL/dx_{k+1}     (dL/dy_0 = dL/dx_1)

so a layer whose output is a concatenation of slices, y = cat_j f(a[s_j], b), needs no graph of any slice
after its recomputation. For each slice s_j in turn, :func:`backpropagate_slices` runs f with a graph from
fresh leaves (a[s_j], b and the leaves f reaches, its parameters), back-propagates dL/dy[s_j] through it at
once and frees it, summing

    dL/da[s_j] = J_a^T dL/dy[s_j],   dL/db += J_b^T dL/dy[s_j],   dL/dp += J_p^T dL/dy[s_j]

over the slices. It returns y as the output of one autograd node whose inputs are a, b and those leaves and
whose backward hands over the sums. Under non-reentrant checkpoint instead, as
:mod:`revbits.bdia.token_slices` runs a slice elsewhere, the recomputation runs each slice once to get y and
the backward runs it again: three forwards per step where gradient checkpointing runs two.

Exact: the slices, their inputs and their order are those of the checkpointed form, so y is the same bit for
bit; the gradients are the same sums in another order. The gradient was predicted, so the node's backward
checks that it receives that tensor (the same object, or one equal to it bit for bit). If anything between
the slices and the block's output changed it (a hook on the layer), the node back-propagates what it
receives, running every slice again as the checkpointed form would: from the same RNG state (dropout draws
the same masks) and under the same autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..rng import RngReplay, RngState, capture_rng_state
from .params import reached_leaves

__all__ = ["backpropagate_slices", "saved_as_they_are"]


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def saved_as_they_are() -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks that keep every tensor as it is, also inside an outer hook that would change it
    (bdia+mesa's 8-bit codes): what a slice saves is what it recomputes from."""
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def _fresh_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(t.requires_grad)


@dataclass
class _Slices:
    """What the slices were run with, for the backward: the function, the slice bounds along ``dim`` and the
    gradients summed over the slices (``grads[i]`` of the node's input i, None where it needs none)."""

    fn: Callable[..., Any]
    dim: int
    bounds: list[slice]
    counts: tuple[int, int]  # how many of the node's inputs are sliced, and how many shared (the rest: leaves)
    expected: torch.Tensor
    grads: list[torch.Tensor | None]
    versions: list[int]  # of the node's inputs when it ran; a fallback on inputs changed since would be wrong
    rng: RngState  # where the slices started drawing (dropout), for a fallback to draw the same
    autocast: tuple[str, bool, torch.dtype]  # the autocast the slices ran under: device type, on, dtype


def _run_slices(
    fn: Callable[..., Any],
    sliced: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    leaves: list[torch.Tensor] | None,
    dim: int,
    bounds: list[slice],
    grad: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """(y, the leaves f reached, the gradients of sliced + shared + leaves) with dL/dy = ``grad``, one slice's
    graph at a time. ``leaves`` None: found from the first slice's graph (the same function reaches the same
    leaves on every slice)."""
    # The slices get views of fresh leaves, not leaves: module hooks that watch their inputs' gradients
    # (torch.distributed._tools' MemTracker) cannot take a leaf inside torch.autograd.grad.
    bases = [_fresh_leaf(t) for t in (*sliced, *shared)]
    outputs: list[torch.Tensor] = []
    sliced_grads: list[torch.Tensor | None] = [None] * len(sliced)
    sums: list[torch.Tensor | None] | None = None
    for rows in bounds:
        with torch.enable_grad(), saved_as_they_are():
            parts = [b.narrow(dim, rows.start, rows.stop - rows.start) for b in bases[: len(sliced)]]
            parts += [b.view_as(b) for b in bases[len(sliced) :]]
            out = fn(*parts, rows=rows)
        if leaves is None:
            own = {id(t) for t in bases}
            leaves = [t for t in reached_leaves(out) if id(t) not in own]
        slice_grad = grad.narrow(dim, rows.start, rows.stop - rows.start)
        found = _gradients(out, [*parts, *leaves], slice_grad)
        for i, (t, g) in enumerate(zip(sliced, found)):
            if g is not None:  # written into one buffer per input: no list of pieces to concatenate
                sliced_grads[i] = torch.zeros_like(t) if sliced_grads[i] is None else sliced_grads[i]
                sliced_grads[i].narrow(dim, rows.start, rows.stop - rows.start).copy_(g)
        rest = found[len(sliced) :]  # the shared inputs and the leaves: summed over the slices
        sums = [_accumulate(total, g, grad) for total, g in zip(sums or [None] * len(rest), rest)]
        outputs.append(out.detach())
        del out, parts, found, rest
    assert leaves is not None and sums is not None
    return torch.cat(outputs, dim=dim), leaves, [*sliced_grads, *sums]


def _gradients(out: torch.Tensor, tensors: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor | None]:
    """J_t^T ``grad`` for each of ``tensors`` (None for one that needs no gradient or is not reached)."""
    wanted = [t for t in tensors if t.requires_grad]
    if not wanted or not out.requires_grad:
        return [None] * len(tensors)
    grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in tensors]


def _accumulate(total: torch.Tensor | None, grad: torch.Tensor | None, incoming: torch.Tensor) -> torch.Tensor | None:
    """total + grad, in the buffer of ``total``, which is this module's own: the first gradient is copied where it
    shares memory with the ``incoming`` gradient (autograd may hand that back for an identity path)."""
    if grad is None:
        return total
    if total is not None:
        return total.add_(grad)
    return grad.clone() if grad.untyped_storage().data_ptr() == incoming.untyped_storage().data_ptr() else grad


class _Backpropagated(torch.autograd.Function):
    """y, already back-propagated: the backward returns the sums for the predicted gradient, or runs the
    slices again for any other (module docstring)."""

    @staticmethod
    def forward(ctx, state: _Slices, output: list[torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.state = state
        ctx.save_for_backward(*inputs)  # under identity hooks, which skip autograd's version check: see versions
        return output.pop()  # handed over in a list, so that nothing else holds it

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        state: _Slices = ctx.state
        ctx.state = None
        if grad is state.expected or torch.equal(grad, state.expected):
            grads = state.grads
        else:  # not the predicted gradient: back-propagate the one received, slice by slice again
            inputs = ctx.saved_tensors
            if [t._version for t in inputs] != state.versions:
                raise RuntimeError(
                    "revbits layer slices: an input of the sliced layer was modified by an inplace operation "
                    "between its recomputation and its backward; the slices cannot be run again on it"
                )
            num_sliced, num_shared = state.counts
            sliced, shared = inputs[:num_sliced], inputs[num_sliced : num_sliced + num_shared]
            leaves = list(inputs[num_sliced + num_shared :])
            device_type, autocast_on, autocast_dtype = state.autocast
            with (
                RngReplay(state.rng, grad.device),
                torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on),
            ):
                _, _, grads = _run_slices(state.fn, sliced, shared, leaves, state.dim, state.bounds, grad)
        return (None, None, *grads)


def backpropagate_slices(
    fn: Callable[..., Any],
    sliced: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    dim: int,
    bounds: list[slice],
    grad: torch.Tensor,
) -> torch.Tensor:
    """y = cat_j fn(*(t[s_j] for t in sliced), *shared, rows=s_j) along ``dim``, each slice back-propagated with
    dL/dy = ``grad`` right after it runs (module docstring); y's autograd node hands the gradients over."""
    rng = capture_rng_state(grad.device)
    device_type = grad.device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    output, leaves, grads = _run_slices(fn, sliced, shared, None, dim, bounds, grad)
    inputs = [*sliced, *shared, *leaves]
    versions = [t._version for t in inputs]
    state = _Slices(fn, dim, bounds, (len(sliced), len(shared)), grad, grads, versions, rng, autocast)
    with saved_as_they_are():  # the inputs kept as they are, as checkpointed() keeps its own
        return _Backpropagated.apply(state, [output], *inputs)
