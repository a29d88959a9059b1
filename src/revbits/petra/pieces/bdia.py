"""BDIA blocks as PETRA pieces: the activation between stages is the pair of states (x_{k-1}, x_k).

With y_k = block_k(x_k), a per-sample g_k = +-gamma (gamma = 2**-b), the grid quantiser Q and the
residue r_{k-1} = (-x_{k-1} 2**l) mod 2**b (the step of :mod:`revbits.bdia.step`, which BDIAStack uses too):

    entry (block 0):   x            -> (x_0, x_1) = (Q(x), Q(y_0))
    step k >= 1:       (x_{k-1}, x_k) -> (x_k, x_{k+1}),
                       x_{k+1} = g_k (x_{k-1} + r_{k-1} 2**-l) + Q((1 + g_k) y_k - 2 g_k x_k)
    exit:              (x_{K-1}, x_K) -> x_K

A step is inverted exactly with the current weights,
x_{k-1} = (x_{k+1} - Q((1 + g_k) y_k - 2 g_k x_k)) / g_k - r_{k-1} 2**-l, from the b residue bits
per element it keeps for each micro-batch in flight: that and the pair are the stage's state.
The signs of g_k and any dropout in the block are drawn from (seed, micro-batch), each from its own
stream (:mod:`.streams`), so the recompute in the backward sees the forward's function. The entry's
inverse returns Q(x), which has the gradient of x (Q is straight-through); the exit is not invertible
and belongs in the last stage.

:func:`stack_pieces` cuts a model's BDIAStack into such pieces, sharing its blocks; :mod:`.gpt` and
:mod:`.vit` add the stem and the head of a GPT and a ViT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ...bdia import BDIAStack
from ...bdia.bits import PackedBits
from ...bdia.fixedpoint import quantize
from ...bdia.step import Step, call_block
from ...rng import derive_seed
from ..stages import Stage, seeded
from . import streams


def _pair(x_prev: Tensor, x_cur: Tensor) -> Tensor:
    return torch.stack([x_prev, x_cur])


class BDIAEntry(Stage):
    """(x_0, x_1) = (Q(x), Q(block_0(Q(x))))."""

    invertible = True

    def __init__(self, block: nn.Module, bits: int = 9, seed: int = 0) -> None:
        super().__init__()
        self.block, self.bits, self.seed = block, bits, seed

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        x0 = quantize(x, self.bits)
        with seeded(self.seed, micro_batch, x.device, *streams.dropout(0)):
            y = call_block(self.block, 0, x0, ())
        return _pair(x0, quantize(y, self.bits))

    @torch.no_grad()
    def inverse(self, y: Tensor, micro_batch: int) -> Tensor:
        """x_0 = Q(x), the first state of the pair."""
        return y[0].clone()


class BDIAStep(Stage):
    """(x_{k-1}, x_k) -> (x_k, x_{k+1}) for block k >= 1; exact inverse from the kept residue bits."""

    invertible = True

    def __init__(self, block: nn.Module, index: int, bits: int = 9, gamma: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if index < 1:
            raise ValueError("block 0 of a BDIA stack is its entry (BDIAEntry), not a step")
        self.block, self.index, self.bits, self.seed = block, index, bits, seed
        self.step = Step(bits, gamma)
        self.gamma, self.gamma_bits = self.step.gamma, self.step.gamma_bits
        self.in_flight: dict[int, PackedBits] = {}  # micro-batch -> residue bits of x_{k-1}

    def gamma_of(self, micro_batch: int, like: Tensor) -> Tensor:
        """g_k per sample, +-gamma, drawn from (seed, micro_batch) and block k's stream of signs."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, micro_batch, *streams.signs(self.index)))
        signs = torch.randint(0, 2, (like.shape[0],), generator=generator).to(like.device, like.dtype) * 2 - 1
        return (signs * self.gamma).view(-1, *([1] * (like.dim() - 1)))

    def _block(self, x_cur: Tensor, micro_batch: int) -> Tensor:
        with seeded(self.seed, micro_batch, x_cur.device, *streams.dropout(self.index)):
            return call_block(self.block, self.index, x_cur, ())

    def forward(self, pair: Tensor, micro_batch: int) -> Tensor:
        x_prev, x_cur = pair[0], pair[1]
        g = self.gamma_of(micro_batch, x_cur)
        y = self._block(x_cur, micro_batch)
        # PETRA's forward phase (no grad) keeps the residue bits the product will drop; the backward's
        # recompute (with grad) needs none, and the bits an inversion did not use are done with.
        keep = not torch.is_grad_enabled()
        x_next, kept = self.step.forward(x_prev, x_cur, y, g, keep=keep)
        if keep:
            assert kept is not None
            self.in_flight[micro_batch] = kept
        else:
            self.in_flight.pop(micro_batch, None)
        return _pair(x_cur, x_next)

    @torch.no_grad()
    def inverse(self, pair: Tensor, micro_batch: int) -> Tensor:
        """(x_{k-1}, x_k) from (x_k, x_{k+1}), exactly, with the current weights and the kept residue bits."""
        if micro_batch not in self.in_flight:
            raise KeyError(f"BDIA block {self.index}: no residue bits kept for micro-batch {micro_batch}")
        x_cur, x_next = pair[0], pair[1]
        g = self.gamma_of(micro_batch, x_cur)
        y = self._block(x_cur, micro_batch)
        return _pair(self.step.inverse(x_next, x_cur, y, g, self.in_flight.pop(micro_batch)), x_cur)


class BDIAExit(Stage):
    """x_K from (x_{K-1}, x_K); not invertible, so it goes in the last stage."""

    invertible = False

    def forward(self, pair: Tensor, micro_batch: int) -> Tensor:
        return pair[1]


def bdia_pieces(
    blocks: Sequence[nn.Module], bits: int = 9, gamma: float = 0.5, seed: int = 0
) -> tuple[list[Stage], BDIAExit]:
    """The pieces of a BDIA stack of ``blocks`` (entry, steps) and its exit."""
    pieces: list[Stage] = [BDIAEntry(blocks[0], bits, seed)]
    pieces += [BDIAStep(block, k, bits, gamma, seed) for k, block in enumerate(blocks) if k]
    return pieces, BDIAExit()


def stack_pieces(model: nn.Module, seed: int = 0) -> tuple[list[Stage], BDIAExit]:
    """:func:`bdia_pieces` of ``model.stack``, which must be a plain BDIAStack (memory="bdia"): the pieces run
    its blocks with its ``bits`` and ``gamma``, and know nothing of a recompute context (bdia+mesa)."""
    kind = type(model).__name__
    if not isinstance(model.stack, BDIAStack):
        got = type(model.stack).__name__
        raise ValueError(f"PETRA needs the {kind}'s blocks in a BDIAStack (memory='bdia'), got {got}")
    if model.stack.recompute_context is not None:
        raise ValueError(
            f"PETRA's BDIA pieces recompute the {kind}'s blocks without its stack's recompute context "
            f"({type(model.stack).__name__}, e.g. memory='bdia+mesa'); build the {kind} with memory='bdia'"
        )
    return bdia_pieces(list(model.stack.blocks), model.stack.bits, model.stack.gamma, seed)


__all__ = ["BDIAEntry", "BDIAExit", "BDIAStep", "bdia_pieces", "stack_pieces"]
