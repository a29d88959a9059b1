"""Pipeline stages: what one PETRA process runs.

A network is a list of *pieces*: :class:`Stage` modules y = F(x, micro_batch) followed by one
:class:`LossStage`. :func:`split` groups the pieces into J contiguous pipeline stages: J - 1
:class:`SequentialStage` and one :class:`LastStage` that ends with the loss.

Activations crossing stages are single tensors (a RevNet's two halves are concatenated along channels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from itertools import accumulate

import torch
from torch import Tensor, nn

from ..rng import derive_seed, seeded_rng


class Stage(nn.Module):
    """One pipeline stage y = F_j(x; theta_j).

    ``forward(x, micro_batch)`` computes F_j. Any randomness in it must be a function of ``micro_batch``
    (see :func:`seeded`), so that the recompute in the backward sees the same F_j as the forward.
    Invertible stages (``invertible = True``, a fact of the class) also implement ``inverse(y, micro_batch)``:
    x = F_j^{-1}(y) with the *current* weights, under no_grad. PETRA keeps no input for them; other stages
    keep their input in a FIFO.
    """

    invertible: bool = False

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        raise NotImplementedError

    def inverse(self, y: Tensor, micro_batch: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not invertible")


class LossStage(nn.Module):
    """The loss head: ``forward(x, target)`` returns the scalar loss L(x, target), a mean over the
    micro-batch."""

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


@contextlib.contextmanager
def seeded(seed: int, micro_batch: int, device: torch.device, *stream: int) -> Iterator[None]:
    """Run the body with the global RNG seeded with derive_seed(seed, micro_batch, *stream), then restore
    it, so that dropout and the like draw the same numbers in the forward and in the backward's recompute.
    ``stream`` tells apart the pieces that draw for the same micro-batch (:mod:`revbits.petra.pieces.streams`)."""
    with seeded_rng(derive_seed(seed, micro_batch, *stream), device):
        yield


class PlainStage(Stage):
    """y = module(x) for any module: not invertible, so PETRA keeps its input in a FIFO and recomputes
    the forward in the backward (activation checkpointing with the current weights). The module runs
    under :func:`seeded` (``seed``, the micro-batch and ``stream``), so dropout is replayed exactly."""

    invertible = False

    def __init__(self, module: nn.Module, seed: int = 0, stream: Sequence[int] = ()) -> None:
        super().__init__()
        self.module = module
        self.seed, self.stream = seed, tuple(stream)

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        with seeded(self.seed, micro_batch, x.device, *self.stream):
            return self.module(x)


class SequentialStage(Stage):
    """y = F_n(...F_1(x)): pieces composed in order. Invertible iff every piece is; then
    x = F_1^{-1}(...F_n^{-1}(y)), the pieces inverted in reverse order."""

    def __init__(self, pieces: Sequence[Stage]) -> None:
        super().__init__()
        if not pieces:
            raise ValueError("a SequentialStage needs at least one piece")
        self.pieces = nn.ModuleList(pieces)
        self.invertible = all(p.invertible for p in pieces)

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        for piece in self.pieces:
            x = piece(x, micro_batch)
        return x

    @torch.no_grad()
    def inverse(self, y: Tensor, micro_batch: int) -> Tensor:
        if not self.invertible:
            kinds = ", ".join(type(p).__name__ for p in self.pieces if not p.invertible)
            raise NotImplementedError(f"this stage is not invertible: it contains {kinds}")
        for piece in reversed(self.pieces):
            y = piece.inverse(y, micro_batch)
        return y


class LastStage(nn.Module):
    """L = head(F_n(...F_1(x)), target): the last pipeline stage, whose pieces (maybe none) end in the
    loss head. PETRA runs its forward and backward in the same step, so it never inverts."""

    invertible = False

    def __init__(self, body: Sequence[Stage], head: LossStage) -> None:
        super().__init__()
        self.body = nn.ModuleList(body)
        self.head = head

    def forward(self, x: Tensor, target: Tensor, micro_batch: int) -> Tensor:
        for piece in self.body:
            x = piece(x, micro_batch)
        return self.head(x, target)


def balanced_sizes(weights: Sequence[int], parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous non-empty groups of ``weights`` that minimise the largest group sum
    (the linear-partition problem, solved exactly by dynamic programming over prefix sums)."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} pieces into {parts} non-empty stages")
    prefix = [0, *accumulate(weights)]
    # cost[p][i]: the smallest possible largest-group sum for the first i pieces in p groups.
    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    cost[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for s in range(p - 1, i):
                c = max(cost[p - 1][s], prefix[i] - prefix[s])
                if c < cost[p][i]:
                    cost[p][i], cut[p][i] = c, s
    sizes, i = [], n
    for p in range(parts, 0, -1):
        sizes.append(i - cut[p][i])
        i = cut[p][i]
    return sizes[::-1]


def sizes_by_params(pieces: Sequence[nn.Module], J: int) -> list[int]:
    """Pieces per stage for J stages balanced by parameter count (:func:`balanced_sizes`)."""
    return balanced_sizes([sum(p.numel() for p in piece.parameters()) for piece in pieces], J)


def split(pieces: Sequence[nn.Module], J: int, sizes: Sequence[int] | None = None) -> list[nn.Module]:
    """Group ``pieces`` (Stages, then one LossStage) into J contiguous pipeline stages.

    ``sizes`` gives the number of pieces per stage; by default the groups are balanced by parameter
    count (:func:`balanced_sizes`); :func:`revbits.petra.profile.sizes_by_time` balances by measured
    time. A group is a
    invertible stage only if all its pieces are invertible; otherwise it is a plain (FIFO) stage.
    Returns J - 1 :class:`SequentialStage` and a final :class:`LastStage`.
    """
    pieces = list(pieces)
    if not pieces or not isinstance(pieces[-1], LossStage):
        raise TypeError("the last piece must be a LossStage")
    for i, piece in enumerate(pieces[:-1]):
        if not isinstance(piece, Stage):
            raise TypeError(f"piece {i} is a {type(piece).__name__}, not a Stage (wrap it in PlainStage)")
    if sizes is None:
        sizes = sizes_by_params(pieces, J)
    sizes = list(sizes)
    if len(sizes) != J or min(sizes) < 1 or sum(sizes) != len(pieces):
        raise ValueError(f"sizes {sizes} must be {J} positive numbers summing to {len(pieces)} pieces")
    ends = list(accumulate(sizes))
    groups = [pieces[end - size : end] for size, end in zip(sizes, ends)]
    return [SequentialStage(g) for g in groups[:-1]] + [LastStage(groups[-1][:-1], groups[-1][-1])]
