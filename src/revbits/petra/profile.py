"""Measured cost of each piece of a network, for splitting it into balanced pipeline stages.

Per micro-batch, one piece costs (median seconds over a few repeats, after a warm-up call):

    f: forward without a graph (0 for the loss head, whose forward runs only with a graph)
    r: inversion (invertible pieces only)
    g: forward with a graph
    b: backward from that graph

A PETRA stage spends f + r + g + b per micro-batch (plain stages: r = 0); GPipe and 1F1B spend g + b.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn

from .stages import balanced_sizes

T = TypeVar("T")


def synchronize() -> None:
    """Wait for queued CUDA work, so that a wall-clock time covers it (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """(fn(), the wall seconds it took), queued CUDA work included."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    return statistics.median([timed(fn)[1] for _ in range(repeats + 1)][1:])


def profile_piece(piece: nn.Module, x: Tensor, target: Tensor, head: bool, repeats: int) -> tuple[dict, Tensor]:
    """The row {piece, invertible, f, r, g, b, out_bytes} of one piece fed ``x``, and its output."""

    def run(inp: Tensor) -> Tensor:
        return piece(inp, target) if head else piece(inp, 0)

    def graph() -> Tensor:
        return run(x.detach().requires_grad_(x.is_floating_point()))

    def forward_no_graph() -> Tensor:
        with torch.no_grad():
            return run(x)

    invertible = bool(getattr(piece, "invertible", False))
    row: dict = {"piece": type(piece).__name__, "invertible": invertible}
    row["f"] = 0.0 if head else median_time(forward_no_graph, repeats)
    row["g"] = median_time(graph, repeats)
    inversions, backwards = [], []
    for _ in range(repeats + 1):
        if invertible:  # BDIA keeps its residue bits in the forward without graph, and uses them here
            y = forward_no_graph()
            inversions.append(timed(lambda y=y: piece.inverse(y, 0))[1])
        out = graph()
        backwards.append(timed(lambda out=out: out.backward(None if head else torch.ones_like(out)))[1])
        piece.zero_grad(set_to_none=True)
    row["r"] = statistics.median(inversions[1:]) if invertible else 0.0
    row["b"] = statistics.median(backwards[1:])
    y = graph().detach()
    row["out_bytes"] = y.numel() * y.element_size()
    return row, y


def profile_pieces(pieces: Sequence[nn.Module], x: Tensor, target: Tensor, repeats: int) -> list[dict]:
    """:func:`profile_piece` for every piece in order, each fed the previous one's output; the last
    piece is the loss head."""
    rows = []
    for i, piece in enumerate(pieces):
        row, x = profile_piece(piece, x, target, i == len(pieces) - 1, repeats)
        rows.append(row)
    return rows


def petra_costs(rows: Sequence[dict]) -> list[int]:
    """Microseconds of f + r + g + b per piece: what each piece adds to its PETRA stage's time step."""
    return [max(1, round(1e6 * (row["f"] + row["r"] + row["g"] + row["b"]))) for row in rows]


def sizes_by_time(pieces: Sequence[nn.Module], x: Tensor, target: Tensor, J: int, repeats: int = 3) -> list[int]:
    """Pieces per stage for J stages balanced by measured PETRA cost (:func:`balanced_sizes` over
    :func:`petra_costs`). The pieces run a few forward and backward passes on (x, target): pass
    copies that are not trained afterwards."""
    return balanced_sizes(petra_costs(profile_pieces(pieces, x, target, repeats)), J)
