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
The signs of g_k and any dropout in the block are drawn from (seed, micro-batch), so the
recompute in the backward sees the forward's function. The entry's inverse returns Q(x), which has
the gradient of x (Q is straight-through); the exit is not invertible and belongs in the last stage.

:func:`gpt_pieces` cuts a :class:`revbits.models.GPT` into such pieces, sharing its modules, as
:func:`revbits.petra.vit_pieces.vit_pieces` does for the ViT.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bdia import BDIAStack
from ..bdia.bits import PackedBits
from ..bdia.fixedpoint import quantize
from ..bdia.step import Step, call_block
from ..models.gpt import GPT, GPTConfig
from ..rng import derive_seed
from .stages import LossStage, PlainStage, Stage, seeded, split


def _pair(x_prev: Tensor, x_cur: Tensor) -> Tensor:
    return torch.stack([x_prev, x_cur])


class BDIAEntry(Stage):
    """(x_0, x_1) = (Q(x), Q(block_0(Q(x))))."""

    reversible = True

    def __init__(self, block: nn.Module, bits: int = 9, seed: int = 0) -> None:
        super().__init__()
        self.block, self.bits, self.seed = block, bits, seed

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        x0 = quantize(x, self.bits)
        with seeded(self.seed, micro_batch, x.device):
            y = call_block(self.block, 0, x0, ())
        return _pair(x0, quantize(y, self.bits))

    @torch.no_grad()
    def inverse(self, y: Tensor, micro_batch: int) -> Tensor:
        """x_0 = Q(x), the first state of the pair."""
        return y[0].clone()


class BDIAStep(Stage):
    """(x_{k-1}, x_k) -> (x_k, x_{k+1}) for block k >= 1; exact inverse from the kept residue bits."""

    reversible = True

    def __init__(self, block: nn.Module, index: int, bits: int = 9, gamma: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        if index < 1:
            raise ValueError("block 0 of a BDIA stack is its entry (BDIAEntry), not a step")
        self.block, self.index, self.bits, self.seed = block, index, bits, seed
        self.step = Step(bits, gamma)
        self.gamma, self.gamma_bits = self.step.gamma, self.step.gamma_bits
        self.in_flight: dict[int, PackedBits] = {}  # micro-batch -> residue bits of x_{k-1}

    def gamma_of(self, micro_batch: int, like: Tensor) -> Tensor:
        """g_k per sample, +-gamma, drawn from (seed, micro_batch, k)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, micro_batch) * 4099 + self.index)
        signs = torch.randint(0, 2, (like.shape[0],), generator=generator).to(like.device, like.dtype) * 2 - 1
        return (signs * self.gamma).view(-1, *([1] * (like.dim() - 1)))

    def _block(self, x_cur: Tensor, micro_batch: int) -> Tensor:
        with seeded(self.seed + self.index, micro_batch, x_cur.device):
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

    reversible = False

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


class GPTStem(nn.Module):
    """x = dropout(E[tokens] + P[positions]), GPT's input, as a module that owns only the embeddings."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.token_embedding, self.position_embedding = gpt.token_embedding, gpt.position_embedding
        self.dropout, self.block_size = gpt.dropout, gpt.config.block_size

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.block_size:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds block_size {self.block_size}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))


class GPTHead(LossStage):
    """L = cross_entropy(W LayerNorm(x), targets), averaged over every position: GPT's ln_f and head."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.ln_f, self.head = gpt.ln_f, gpt.head

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def gpt_pieces(gpt: GPT, seed: int = 0, untie: bool = False) -> list[nn.Module]:
    """Stem, BDIA entry and steps, exit and head of ``gpt``, whose block stack must be a BDIAStack.

    The pieces share the GPT's modules, so training them trains the GPT itself. GPT ties its output
    projection to the token embedding; PETRA's first and last stages run in separate processes and cannot
    add up the two gradients of one matrix, so a tied GPT is refused unless ``untie=True``, which gives
    ``gpt.head`` its own copy of the matrix (the GPT computes the same function, and from then on trains
    the two copies apart).
    """
    pieces, exit_piece = stack_pieces(gpt, seed)
    if gpt.head.weight is gpt.token_embedding.weight:
        if not untie:
            raise ValueError(
                "this GPT ties its output projection to its token embedding, which PETRA's first and last "
                "stages would each train on half of the gradient; pass untie=True to give the head its own copy"
            )
        gpt.head.weight = nn.Parameter(gpt.token_embedding.weight.detach().clone())
    return [PlainStage(GPTStem(gpt), seed), *pieces, exit_piece, GPTHead(gpt)]


def bdia_gpt_pieces(
    vocab: int = 32,
    d_model: int = 32,
    n_head: int = 2,
    n_layer: int = 4,
    max_len: int = 16,
    dropout: float = 0.0,
    bits: int = 9,
    gamma: float = 0.5,
    seed: int = 0,
) -> list[nn.Module]:
    """A causal character GPT (:class:`revbits.models.GPT`, memory="bdia", untied) as PETRA pieces."""
    config = GPTConfig(
        vocab_size=vocab,
        block_size=max_len,
        n_layer=n_layer,
        n_head=n_head,
        d_model=d_model,
        dropout=dropout,
        memory="bdia",
        memory_options={"bits": bits, "gamma": gamma},
    )
    return gpt_pieces(GPT(config), seed, untie=True)


def bdia_gpt_pipeline(J: int, sizes: Sequence[int] | None = None, **model) -> list[nn.Module]:
    """``split(bdia_gpt_pieces(**model), J, sizes)``: a picklable ``build_stages``."""
    return split(bdia_gpt_pieces(**model), J, sizes)


__all__ = [
    "BDIAEntry",
    "BDIAExit",
    "BDIAStep",
    "GPTHead",
    "GPTStem",
    "bdia_gpt_pieces",
    "bdia_gpt_pipeline",
    "bdia_pieces",
    "gpt_pieces",
    "stack_pieces",
]
