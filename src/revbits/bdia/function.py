"""The autograd Function of :class:`~revbits.BDIAStack`: a forward without a graph, and a backward that
rebuilds every state from the last two, exactly, while it back-propagates.

Forward, with y_k = block_k(x_k), the grid quantiser Q and g_k = +-2**-b per sample:

    x_1     = Q(y_0)
    x_{k+1} = g_k (x_{k-1} + r_{k-1} 2**-l) + Q((1 + g_k) y_k - 2 g_k x_k),   k >= 1

Backward, for k = K-1 .. 1, with dL/dx_K the incoming gradient:

    recompute y_k = block_k(x_k) with a graph;  u = Q((1 + g_k) y_k - 2 g_k x_k)
    x_{k-1}  = (x_{k+1} - u) / g_k - r_{k-1} 2**-l
    dL/dx_k  = g_{k+1} dL/dx_{k+2} - 2 g_k dL/dx_{k+1} + J_{y_k}^T ((1 + g_k) dL/dx_{k+1})     (Q straight-through)

where the first term is absent at k = K-1, and for block 0 (x_1 = Q(y_0)):

    dL/dx_0  = g_1 dL/dx_2 + J_{y_0}^T dL/dx_1.

Where the forward kept block K-1's graph (``keep_last_graph``, :mod:`revbits.bdia.top_graph`), the backward
takes y_{K-1} and its graph from there instead of recomputing it; everything else is the same.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..rng import RngReplay, capture_rng_state
from . import native_step
from .args import BlockArguments
from .bits import PackedBits
from .chunks import AUTO
from .compile import forward_arguments, forward_block
from .fixedpoint import quantize
from .gradients import Gradients, recompute, skip_gradient
from .params import EngineRequest, check_parameters_unchanged
from .plan import ForwardState
from .step import raise_if_out_of_range, state_checksum, stream_extremes
from .top_graph import record_top_block, release_kept_graphs, wait_for_backward
from .verify import compare_block0, compare_state, raise_on_mismatch

__all__ = ["BDIAFunction"]

_HIGHER_ORDER = (
    "BDIAStack computes first-order gradients only: its backward rebuilds the activations "
    "instead of storing them, and that rebuild cannot be differentiated again. For "
    "create_graph=True (higher-order gradients) set `stack.reversible = False` (plain autograd on the "
    "same forward), and if the blocks call scaled_dot_product_attention, run the forward inside "
    "`with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):`, since the fused "
    "attention kernels (flash, memory-efficient) have no double backward."
)


class BDIAFunction(torch.autograd.Function):
    """``apply(state, x_0, *tensor_args, *params, probe)`` -> x_K (the equations of the module docstring)."""

    @staticmethod
    def forward(ctx, state: ForwardState, x0: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        config, split = state.config, state.split
        arg_tensors = inputs[: len(state.tensor_slots)]
        x0 = x0.detach()  # nothing here is differentiable (bdia.tools: module trackers)
        block_args = forward_arguments(state.block_args, split, arg_tensors, any(state.compiled))
        release_kept_graphs()  # graphs an earlier forward kept under "auto" would live through this whole step
        top = len(config.blocks) - 1 if state.keep_last_graph else -1  # the block whose graph is kept, if any
        top_arg_inputs = [a.detach().requires_grad_(a.requires_grad) for a in arg_tensors] if top >= 0 else []
        x_k_minus_1, x_k = None, x0
        extremes = [stream_extremes(x0)]
        for k in range(len(config.blocks)):
            if config.preserve_rng:  # chunk c + 1 draws from where chunk c left the RNG, in both passes
                state.rng_states.append(capture_rng_state(x0.device))
            if config.check:
                state.states.append(x_k)
            elif config.verify and k < len(config.blocks) - 1:  # the backward rebuilds x_0 .. x_{K-2}
                state.checksums.append(state_checksum(x_k))
            top_args = top_arg_inputs if k == top else None
            x_k_plus_1, planes = _forward_through(state, k, x_k_minus_1, x_k, block_args, top_args)
            if planes is not None:
                state.residue_planes.append(planes)
            x_k_minus_1, x_k = x_k, x_k_plus_1
            extremes.append(stream_extremes(x_k))
        raise_if_out_of_range(extremes, x0.dtype, config.bits)
        # The two states are kept as detached aliases rather than saved tensors, so backward
        # can let go of each one as soon as it is rebuilt past; x_K's version counter (shared
        # with the output) still reveals an in-place change of the output.
        assert x_k_minus_1 is not None
        state.last_states = [x_k_minus_1, x_k.detach()]
        state.output_version = x_k._version
        state.drawn_signs = None  # the backward reads the packed bits
        if state.kept and config.keep_last_graph == AUTO:
            wait_for_backward(state)
        ctx.state = state
        ctx.save_for_backward(*arg_tensors)
        return x_k

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        state = _begin_backward(ctx)
        # The walk alone holds x_{K-1} and x_K, so each is freed once the backward has rebuilt past it.
        x_top_minus_1, x_top = state.last_states
        state.last_states = []
        walk = _Walk(x_k=x_top_minus_1, x_k_plus_1=x_top, grad_x_k_plus_1=grad_out, grad_out=grad_out)
        del x_top_minus_1, x_top
        arg_inputs = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        grads = Gradients(state, arg_inputs, EngineRequest(getattr(ctx, "next_functions", None)))
        for k in range(len(state.config.blocks) - 1, -1, -1):
            _backward_through(state, k, walk, arg_inputs, grads)
        raise_on_mismatch(state, walk.mismatches)
        if state.config.backward_ends is not None:
            state.config.backward_ends()
        # After block 0 the walk has stepped to k = -1: its dL/dx_{k+1} is dL/dx_0.
        return (None, walk.grad_x_k_plus_1, *grads.args, *grads.params, None)  # None: the probe of EngineRequest


def _forward_through(
    state: ForwardState,
    k: int,
    x_k_minus_1: torch.Tensor | None,
    x_k: torch.Tensor,
    block_args: tuple[list[BlockArguments], list[BlockArguments]],
    top_arg_inputs: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, list[PackedBits] | None]:
    """Block k of the forward, chunk by chunk: x_{k+1} (the module docstring's equations) and, for k >= 1, the
    residue planes of each chunk. ``block_args`` are :func:`forward_arguments`'s per chunk. With ``top_arg_inputs``
    (the top block under ``keep_last_graph``) the block runs as the backward would recompute it, and its graph is
    kept (bdia.top_graph)."""
    config, split = state.config, state.split
    chunk_args, leaf_args = block_args
    # Chunk c of x_{k+1} reads only chunk c of x_{k-1} and x_k, so it can overwrite x_{k-1} in place once that
    # buffer is this forward's own (not the input x_0; check=True keeps all). With one chunk x_{k+1} is the step's
    # own (contiguous) result, and no buffer or copy is needed.
    owned = k >= 2 and not config.check  # x_{k-1} is x_0 at k = 1
    x_k_plus_1 = None if split.chunks == 1 else x_k_minus_1 if owned else torch.empty_like(x_k)
    gamma_k = state.gamma_of(k, x_k) if k else None
    planes: list[PackedBits] = []
    for c in range(split.chunks):
        x_k_chunk = split.part(x_k, c)
        if top_arg_inputs is not None:
            state.kept.append(record_top_block(state, k, x_k_chunk, top_arg_inputs, c))
            y_k = state.kept[-1].output.detach()
        else:
            args = leaf_args[c] if state.compiled[k] else chunk_args[c]
            y_k = forward_block(config.blocks[k], k, x_k_chunk, args, state.compiled[k])
        target = None if x_k_plus_1 is None else split.part(x_k_plus_1, c)  # where chunk c of x_{k+1} goes
        if gamma_k is None:
            x_next = quantize(y_k, config.bits).contiguous()  # every state has one memory layout
        else:
            assert x_k_minus_1 is not None
            x_prev_chunk, gamma_chunk = split.part(x_k_minus_1, c), split.part(gamma_k, c)
            x_next, kept = config.step.forward(x_prev_chunk, x_k_chunk, y_k, gamma_chunk, out=target)
            assert kept is not None
            planes.append(kept)
        del y_k
        if target is None:
            x_k_plus_1 = x_next
        elif x_next is not target:  # the native step writes in target itself
            target.copy_(x_next)
        del x_next, target
    assert x_k_plus_1 is not None
    return x_k_plus_1, (planes if gamma_k is not None else None)


@dataclass
class _Walk:
    """The state-sized tensors of the backward as it stands before block k, and the checks so far.

    Chunk by chunk, block k writes x_{k-1} over x_{k+1} and dL/dx_k over dL/dx_{k+2}, except over the output
    x_K and autograd's ``grad_out``, which are not this backward's to overwrite: four buffers, plus
    ``grad_out`` (the engine holds it) and, during block K-1, x_K.
    """

    x_k: torch.Tensor
    x_k_plus_1: torch.Tensor
    grad_x_k_plus_1: torch.Tensor  # dL/dx_{k+1}
    grad_out: torch.Tensor  # dL/dx_K as autograd handed it over
    grad_x_k_plus_2: torch.Tensor | None = None  # dL/dx_{k+2}; None at k = K-1
    gamma_k_plus_1: torch.Tensor | None = None  # g_{k+1}; None at k = K-1
    x_k_plus_1_is_output: bool = True  # x_{k+1} is x_K, the stack's output
    mismatches: list[torch.Tensor] | None = None  # per rebuilt state, whether its checksum differed

    def __post_init__(self) -> None:
        self.mismatches = []

    def step_down(self, x_k_minus_1: torch.Tensor | None, grad_x_k: torch.Tensor, gamma_k: torch.Tensor | None) -> None:
        """From block k to block k - 1: x_{k-1} and dL/dx_k become the walk's x_k and dL/dx_{k+1}."""
        if x_k_minus_1 is not None:
            self.x_k_plus_1, self.x_k, self.x_k_plus_1_is_output = self.x_k, x_k_minus_1, False
        self.grad_x_k_plus_2, self.grad_x_k_plus_1, self.gamma_k_plus_1 = self.grad_x_k_plus_1, grad_x_k, gamma_k


def _backward_through(
    state: ForwardState, k: int, walk: _Walk, arg_inputs: list[torch.Tensor], grads: Gradients
) -> None:
    """Block k of the backward, chunk by chunk: rebuild x_{k-1} (k >= 1) and form dL/dx_k (the module
    docstring's equations), adding the gradients of the block's tensors and arguments to ``grads``."""
    config, split = state.config, state.split
    gamma_k = state.gamma_of(k, walk.x_k) if k else None
    residue_planes = state.residue_planes[k - 1] if k else None
    if k:
        state.residue_planes[k - 1] = None  # its memory is no longer needed
    # x_{k-1} goes over x_{k+1} chunk by chunk; with one chunk it is the inverse's own (contiguous) result.
    x_k_minus_1 = None
    if k and split.chunks > 1:
        x_k_minus_1 = torch.empty_like(walk.x_k) if walk.x_k_plus_1_is_output else walk.x_k_plus_1
    reuse = walk.grad_x_k_plus_2 is not None and walk.grad_x_k_plus_2 is not walk.grad_out
    grad_x_k = walk.grad_x_k_plus_2 if reuse else torch.empty_like(walk.x_k)
    assert grad_x_k is not None and walk.mismatches is not None
    kept = state.kept if k == len(config.blocks) - 1 else []  # the top block's graphs, if the forward kept them
    state.kept = [] if kept else state.kept
    replay_rng = config.preserve_rng and not kept
    rng = state.rng_states[k] if replay_rng else None
    check_parameters_unchanged(config.blocks[k], k, state.block_params[k])
    block0_mismatches: list[torch.Tensor] = []
    for c in range(split.chunks):
        with RngReplay(rng, walk.x_k.device, replay_rng), _forward_autocast(state):
            grad_x_k_plus_1_chunk = split.part(walk.grad_x_k_plus_1, c)
            gamma_k_chunk = None if gamma_k is None else split.part(gamma_k, c)
            grad_x_k_chunk = split.part(grad_x_k, c)
            later = [None if t is None else split.part(t, c) for t in (walk.grad_x_k_plus_2, walk.gamma_k_plus_1)]
            grad_y_k, skipped = _gradients_before_block(grad_x_k_chunk, later, grad_x_k_plus_1_chunk, gamma_k_chunk)
            if kept:  # the forward's graph of this chunk, handed over (bdia.top_graph)
                graph, kept[c] = kept[c], None
                x_k_leaf, y_k, held, arg_leaves = graph.state_leaf, graph.output, graph.held, graph.arg_leaves
                del graph
            else:
                arg_leaves = [split.leaf(a, c) for a in arg_inputs]
                chunk_args = split.tree(state.block_args(arg_leaves), c)
                x_k_leaf, y_k, held = recompute(state, k, split.part(walk.x_k, c), chunk_args, grad_y_k)
                del chunk_args
            if replay_rng and c + 1 < split.chunks:
                rng = capture_rng_state(walk.x_k.device)  # where chunk c + 1 starts
            if gamma_k_chunk is None:  # block 0: the recomputed x_1 = Q(y_0) must be the one block 1 rebuilt
                compare_block0(state, y_k.detach(), split.part(walk.x_k_plus_1, c), block0_mismatches)
            else:  # rebuild x_{k-1}, then form the gradients that bypass the block
                assert residue_planes is not None
                x_k_plus_1_chunk, x_k_chunk = split.part(walk.x_k_plus_1, c), split.part(walk.x_k, c)
                target = None if x_k_minus_1 is None else split.part(x_k_minus_1, c)
                planes = residue_planes[c]
                rebuilt = config.step.inverse(x_k_plus_1_chunk, x_k_chunk, y_k, gamma_k_chunk, planes, target)
                del x_k_plus_1_chunk, x_k_chunk, planes
                if target is None:  # one chunk. x_{k+1} is not read again: let it go, as chunks overwrite it
                    x_k_minus_1, walk.x_k_plus_1 = rebuilt, rebuilt
                elif rebuilt is not target:  # the native inverse writes in target itself
                    target.copy_(rebuilt)
                del rebuilt, target
            if not skipped:
                skip_gradient(grad_x_k_chunk, *later, grad_x_k_plus_1_chunk, gamma_k_chunk)
            del grad_x_k_plus_1_chunk, later
        grad_x_k_through_block = grads.through_block(k, c, y_k, grad_y_k, x_k_leaf, arg_leaves, held)
        del y_k, x_k_leaf, grad_y_k, arg_leaves, held
        if grad_x_k_through_block is not None:
            grad_x_k_chunk.add_(grad_x_k_through_block)
        del grad_x_k_through_block, grad_x_k_chunk
    if x_k_minus_1 is not None:
        compare_state(state, k - 1, x_k_minus_1, walk.mismatches)
    elif block0_mismatches:
        several = len(block0_mismatches) > 1
        walk.mismatches.append(torch.stack(block0_mismatches).any() if several else block0_mismatches[0])
    walk.step_down(x_k_minus_1, grad_x_k, gamma_k)


def _gradients_before_block(
    grad_x_k: torch.Tensor,
    later: list[torch.Tensor | None],
    grad_x_k_plus_1: torch.Tensor,
    gamma_k: torch.Tensor | None,
) -> tuple[torch.Tensor, bool]:
    """dL/dy_k = (1 + g_k) dL/dx_{k+1} (dL/dy_0 = dL/dx_1), known before block k is recomputed, for one chunk;
    and whether the part of dL/dx_k that bypasses the block (:func:`skip_gradient`, ``later`` its dL/dx_{k+2}
    and g_{k+1}) is already in ``grad_x_k``: the native kernel forms both in one pass where it applies."""
    if gamma_k is None:
        return grad_x_k_plus_1, False
    fused = native_step.step_gradients(grad_x_k, later[0], later[1], grad_x_k_plus_1, gamma_k)
    if fused is not None:
        return fused, True
    return (1 + gamma_k) * grad_x_k_plus_1, False


def _forward_autocast(state: ForwardState) -> contextlib.AbstractContextManager:
    """The forward's autocast setting for a recomputation: no context where autocast is off then and now."""
    device_type, enabled, dtype = state.autocast
    if not enabled and not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


def _begin_backward(ctx: Any) -> ForwardState:
    """The state of this forward, handed over once; raises for a second backward, a higher-order one, or an
    output modified in place since the forward."""
    if torch.is_grad_enabled():
        raise RuntimeError(_HIGHER_ORDER)
    state: ForwardState | None = ctx.state
    if state is None:
        raise RuntimeError(
            "BDIAStack: backward already ran for this forward and its stored bits were used "
            "up (retain_graph=True is not supported); run the forward pass again"
        )
    ctx.state = None
    if state.last_states[1]._version != state.output_version:
        raise RuntimeError(
            "the output of BDIAStack was modified in place before backward; the states "
            "cannot be rebuilt from it (use an out-of-place operation)"
        )
    return state
