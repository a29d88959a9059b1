"""A small RevNet as a list of PETRA pieces: stem, reversible coupling stages, downsampling, loss head.

Sized for 1x28x28 images (Fashion-MNIST); any image size works since the head pools globally.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stages import LossStage, PlainStage, Stage, split


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with one group: a per-sample LayerNorm over (C, H, W) (see :class:`RevCouplingBlock` for
    why not BatchNorm). One group per channel (InstanceNorm) removes each channel's mean, which is all
    the global-average-pool head sees, and a toy problem then does not learn at all."""
    return nn.GroupNorm(1, channels)


class RevCouplingBlock(nn.Module):
    """RevNet additive half-coupling with a swap (Gomez et al., 2017):

        forward:  (x, x~) -> (x~ + F(x), x)
        inverse:  (y, y~) -> (y~, y - F(y~))

    where the halves are the two channel halves of one tensor and F = conv-norm-ReLU-conv-norm acts on
    one half. The norm is GroupNorm, not BatchNorm: in training mode BatchNorm normalises with the
    statistics of the batch and updates its running statistics on every call, so PETRA's forward, its
    inversion and its recompute would each count the micro-batch once more; GroupNorm depends only on
    the sample and the weights, so the inverse and the recompute see exactly the F of the forward.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"a coupling block splits channels in two halves; got {channels} channels")
        half = channels // 2
        self.f = nn.Sequential(
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            norm(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            norm(half),
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([b + self.f(a), a], dim=1)

    def invert(self, y: Tensor) -> Tensor:
        u, v = y.chunk(2, dim=1)
        return torch.cat([v, u - self.f(v)], dim=1)


class RevNetStage(Stage):
    """y = B_n(...B_1(x)) for coupling blocks B_i; x = B_1^{-1}(...B_n^{-1}(y)) with the current weights."""

    reversible = True

    def __init__(self, channels: int, blocks: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RevCouplingBlock(channels) for _ in range(blocks))

    def forward(self, x: Tensor, micro_batch: int) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def invert(self, y: Tensor, micro_batch: int) -> Tensor:
        for block in reversed(self.blocks):
            y = block.invert(y)
        return y


class ClassifierHead(LossStage):
    """L = cross_entropy(W mean_{h,w}(x) + b, target): global average pool, linear, cross-entropy."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def logits(self, x: Tensor) -> Tensor:
        """W mean_{h,w}(x) + b."""
        return self.linear(x.mean(dim=(2, 3)))

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.logits(x), target)


def conv_stage(c_in: int, c_out: int, stride: int) -> PlainStage:
    """x -> ReLU(norm(conv3x3_stride(x))): the stem and the downsampling stages (not invertible)."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    return PlainStage(nn.Sequential(conv, norm(c_out), nn.ReLU()))


def small_revnet(
    in_channels: int = 1,
    channels: int = 16,
    levels: Sequence[int] = (2, 2),
    blocks_per_stage: int = 1,
    num_classes: int = 10,
) -> list[nn.Module]:
    """The pieces of a small RevNet: a stride-2 stem conv to ``channels``, then for each level that many
    :class:`RevNetStage` (each of ``blocks_per_stage`` coupling blocks), with a stride-2 conv doubling
    the channels between levels, and a :class:`ClassifierHead`. Feed the list to :func:`split`."""
    pieces: list[nn.Module] = [conv_stage(in_channels, channels, stride=2)]
    for i, n in enumerate(levels):
        if i:
            pieces.append(conv_stage(channels, 2 * channels, stride=2))
            channels *= 2
        pieces += [RevNetStage(channels, blocks_per_stage) for _ in range(n)]
    pieces.append(ClassifierHead(channels, num_classes))
    return pieces


class RevNet(nn.Module):
    """The pieces of :func:`small_revnet` as one image classifier: logits = head(P_n(...P_1(images))).

    Trained on one process it is plain backprop; ``revbits.petra`` trains the same pieces (and so the
    same parameters, under the same names) stage-parallel, with the coupling stages inverted.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 16,
        levels: Sequence[int] = (2, 2),
        blocks_per_stage: int = 1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.pieces = nn.ModuleList(small_revnet(in_channels, channels, levels, blocks_per_stage, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        x = images
        for piece in self.pieces[:-1]:
            x = piece(x, 0)  # the stem and downsampling convs draw no random numbers
        return self.pieces[-1].logits(x)


def revnet_pipeline(J: int, sizes: Sequence[int] | None = None, **model: int | Sequence[int]) -> list[nn.Module]:
    """``split(small_revnet(**model), J, sizes)``: a picklable ``build_stages`` for
    ``functools.partial(revnet_pipeline, J, ...)``."""
    return split(small_revnet(**model), J, sizes)
