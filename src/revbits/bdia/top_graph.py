"""The top block's graph kept from the forward (``BDIAStack(keep_last_graph=...)``).

BDIA's backward recomputes every block with a graph, as activation checkpointing does, so a step costs
one more forward of the stack than plain autograd's. The first block the backward needs is the top one,
K-1, and it needs it at once: recomputing it right after the forward ran it gains nothing in memory
at the moment the backward reaches it. So, as ``torch.utils.checkpoint`` practice leaves the last
segment unrecomputed, the forward may run block K-1 with autograd recording, from a fresh leaf x_{K-1}
(the way the backward's recomputation runs it: :func:`revbits.bdia.gradients.recompute`, the same
recompute context, token slices, held-tensor stand-ins and argument leaves), keep that graph, and the
backward then back-propagates through it instead of recomputing block K-1; blocks K-2 .. 0 are
recomputed as before. Exact, because the recomputation is bit-identical to the forward (which the stack
checks for every other block): the kept y_{K-1}, the x_K made from it, the x_{K-2} rebuilt from it and
every gradient are the recompute path's, bit for bit.

Memory: the kept graph (one block's activations, every batch chunk's) lives from the end of the stack's
forward through everything after it until the backward reaches block K-1: the head, the loss and their
backward. The recompute path holds such a graph only during the stack's backward, one chunk at a time.
So keeping it raises the step's peak by up to the graph's size when the head's region is larger than
what the stack's backward holds besides the graph (an LLM head with a 150k vocabulary at short context),
or when batch chunks or token slices make the recomputed graph smaller than the whole block's graph.
``"auto"`` keeps it only where neither can happen for the stack alone to know:

- the step runs in one batch chunk and the token slices cut nothing (the stream has no more positions
  than one slice holds at its width), so the kept graph is exactly the graph the backward would build;
- no ``recompute_context`` (bdia+mesa keeps 8-bit codes; left to recomputation);
- no block is its own FSDP unit (FSDP gathers and frees a unit's parameters around each recomputation).

Language models converted by :func:`revbits.hf.convert` set ``keep_last_graph=False`` (their heads are
large); ``True`` keeps the graph wherever it is right, and raises where it is not (a block that is its
own FSDP unit).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .chunks import AUTO, BatchSplit
from .gradients import recompute
from .params import sharded_block
from .token_slices import slice_length

__all__ = ["KeptGraph", "check_keep_last_graph", "keeps_last_graph", "record_top_block", "release_kept_graphs"]

#: The forwards whose top-block graph, kept under "auto", still waits for its backward.
_WAITING: list[weakref.ref] = []

Option = bool | str


@dataclass
class KeptGraph:
    """The top block's graph of one batch chunk: the leaf x_{K-1} it starts from, its output y_{K-1}, the leaves
    standing in for held non-leaf tensors (:func:`revbits.bdia.params.detached_held_tensors`) and the argument
    leaves of the chunk."""

    state_leaf: torch.Tensor
    output: torch.Tensor
    held: dict[int, torch.Tensor]
    arg_leaves: list[torch.Tensor]


def check_keep_last_graph(value: Option) -> Option:
    """The option ``keep_last_graph`` if valid: True, False or ``"auto"``."""
    if value is True or value is False or value == AUTO:
        return value
    raise ValueError(f"keep_last_graph must be True, False or 'auto', got {value!r}")


def _token_slices_cut(option: int | str | None, x0: torch.Tensor, split: BatchSplit) -> bool:
    """Whether token slices of ``option`` would cut the positions of one batch chunk of a stream like ``x0``."""
    if option is None or x0.dim() < 2:
        return False
    width = x0.shape[-1]
    positions = x0.numel() // max(1, width) // split.chunks
    length = slice_length(option, width)
    return length is not None and positions > length


def keeps_last_graph(option: Option, config: Any, split: BatchSplit, x0: torch.Tensor) -> bool:
    """Whether this forward keeps the top block's graph: ``option`` True or False, or the rule of ``"auto"`` (module
    docstring). Raises ValueError for True where it cannot be right."""
    if option is True:
        if (sharded := sharded_block(config.blocks)) is not None:
            raise ValueError(
                f"keep_last_graph=True: {sharded}, which frees the unit's gathered parameters after its forward, "
                "so the block's graph cannot be kept; use keep_last_graph=False or 'auto'"
            )
        return True
    if option is False:
        return False
    return (
        split.chunks == 1
        and not _token_slices_cut(config.token_slice, x0, split)
        and config.recompute_context is None
        and sharded_block(config.blocks) is None
    )


def record_top_block(
    state: Any, k: int, x_k: torch.Tensor, arg_inputs: list[torch.Tensor], chunk: int
) -> KeptGraph:
    """Run chunk ``chunk`` of block ``k`` (the top one) with a graph, as the backward would recompute it, from
    the forward's x_k chunk and fresh leaves of the tensor arguments (``arg_inputs``, split by the chunk)."""
    split = state.split
    arg_leaves = [split.leaf(a, chunk) for a in arg_inputs]
    x_leaf, y, held = recompute(state, k, x_k, split.tree(state.block_args(arg_leaves), chunk))
    return KeptGraph(x_leaf, y, held, arg_leaves)


def wait_for_backward(state: Any) -> None:
    """Note that ``state`` (a forward under ``"auto"``) holds a kept graph until its backward takes it."""
    _WAITING.append(weakref.ref(state))


def release_kept_graphs() -> None:
    """Drop the graphs that forwards under ``"auto"`` kept and whose backward has not run: called when another
    reversible forward starts, whose whole step would otherwise run on top of them (an encoder stack's graph
    through the decoder stack's forward and backward, several micro-batches' forwards before their backwards).
    Their backward then recomputes the top block as every other, from the RNG state the forward saved for it."""
    while _WAITING:
        state = _WAITING.pop()()
        if state is not None:
            state.kept = []
