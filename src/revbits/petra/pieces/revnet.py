"""The RevNet of :mod:`revbits.models.revnet` as PETRA pieces that share its modules: stem, invertible
coupling stages, downsampling, loss head.

Training the pieces trains the model itself, so the weights load into the plain model unchanged; the
pieces name their parameters as the model's pieces do (``module.*``, ``blocks.*``, ``linear.*``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ...models.revnet import ConvStage, CouplingStage, PoolHead, RevCouplingBlock, RevNet, RevNetConfig
from ..stages import LossStage, PlainStage, Stage, split
from . import streams

# RevCouplingBlock: the RevNet's block, also reachable as revbits.petra.RevCouplingBlock
__all__ = ["ClassifierHead", "RevCouplingBlock", "RevNetStage", "revnet_pieces", "revnet_pipeline", "small_revnet"]


class RevNetStage(Stage):
    """A :class:`~revbits.models.revnet.CouplingStage` (given, or a new one of ``channels`` and ``blocks``)
    as an invertible PETRA stage: y = B_n(...B_1(x)); x = B_1^{-1}(...B_n^{-1}(y)) with the current weights."""

    invertible = True

    def __init__(self, channels: int | CouplingStage, blocks: int = 1) -> None:
        super().__init__()
        plain = channels if isinstance(channels, CouplingStage) else CouplingStage(channels, blocks)
        self.blocks = plain.blocks
        self._forward, self._inverse = plain.forward, plain.inverse  # bound methods over the same blocks

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        return self._forward(x)

    def inverse(self, y: Tensor, micro_batch: int) -> Tensor:
        return self._inverse(y)


class ClassifierHead(LossStage):
    """L = cross_entropy(W mean_{h,w}(x) + b, target) over a :class:`~revbits.models.revnet.PoolHead`
    (given, or a new one of ``channels`` and ``num_classes``)."""

    def __init__(self, channels: int | PoolHead, num_classes: int = 10) -> None:
        super().__init__()
        plain = channels if isinstance(channels, PoolHead) else PoolHead(channels, num_classes)
        self.linear = plain.linear
        self.logits = plain.forward  # W mean_{h,w}(x) + b, a bound method over the same linear layer

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(x), target)


def revnet_pieces(model: RevNet, seed: int = 0) -> list[nn.Module]:
    """The PETRA pieces of ``model``: its conv stages as :class:`PlainStage`, its coupling stages as
    :class:`RevNetStage` and its head as :class:`ClassifierHead`, all sharing the model's modules. (The
    RevNet draws no random numbers; a conv stage's stream is that of plain piece i all the same.)"""
    pieces: list[nn.Module] = []
    for i, piece in enumerate(model.pieces):
        if isinstance(piece, CouplingStage):
            pieces.append(RevNetStage(piece))
        elif isinstance(piece, PoolHead):
            pieces.append(ClassifierHead(piece))
        elif isinstance(piece, ConvStage):
            pieces.append(PlainStage(piece.module, seed, streams.plain(i)))
        else:
            raise TypeError(f"a RevNet piece is a ConvStage, CouplingStage or PoolHead, not {type(piece).__name__}")
    return pieces


def small_revnet(
    in_channels: int = 1,
    channels: int = 16,
    levels: Sequence[int] = (2, 2),
    blocks_per_stage: int = 1,
    num_classes: int = 10,
) -> list[nn.Module]:
    """The pieces of a new :class:`~revbits.models.RevNet` (:func:`revnet_pieces`): a stride-2 stem conv
    to ``channels``, then for each level that many :class:`RevNetStage` (each of ``blocks_per_stage``
    coupling blocks), with a stride-2 conv doubling the channels between levels, and a
    :class:`ClassifierHead`. Feed the list to :func:`split`."""
    return revnet_pieces(RevNet(RevNetConfig(in_channels, channels, tuple(levels), blocks_per_stage, num_classes)))


def revnet_pipeline(J: int, sizes: Sequence[int] | None = None, **model: int | Sequence[int]) -> list[nn.Module]:
    """``split(small_revnet(**model), J, sizes)``: a picklable ``build_stages`` for
    ``functools.partial(revnet_pipeline, J, ...)``."""
    return split(small_revnet(**model), J, sizes)
