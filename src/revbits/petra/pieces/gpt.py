"""A revbits GPT (memory="bdia") as PETRA pieces that share its modules:

    stem:   tokens -> dropout(E[tokens] + P[positions])          (plain: kept in a FIFO)
    BDIA:   entry (block 0), steps 1..K-1                         (invertible: residue bits in flight)
    exit:   (x_{K-1}, x_K) -> x_K                                 (last stage)
    head:   L = cross_entropy(W LayerNorm(x_K), targets)          (last stage)

Training the pieces trains the GPT itself. :func:`bdia_gpt_pieces` and :func:`bdia_gpt_pipeline` build a
small new GPT and cut it, for tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...models.gpt import GPT, GPTConfig
from ..stages import LossStage, PlainStage, split
from . import streams
from .bdia import stack_pieces


class GPTStem(nn.Module):
    """x = GPT.embed(tokens), as a module that owns only the embeddings."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.token_embedding, self.position_embedding = gpt.token_embedding, gpt.position_embedding
        self.dropout = gpt.dropout
        self.embed = gpt.embed  # a bound method over the same modules (registers no parameters)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.embed(tokens)


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
    return [PlainStage(GPTStem(gpt), seed, streams.plain(0)), *pieces, exit_piece, GPTHead(gpt)]


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


__all__ = ["GPTHead", "GPTStem", "bdia_gpt_pieces", "bdia_gpt_pipeline", "gpt_pieces"]
