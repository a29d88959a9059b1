"""A small RevNet image classifier (Gomez et al., 2017) of additive coupling stages.

images -> stride-2 conv stem to ``channels`` -> for each level, that many coupling stages (a stride-2 conv
doubling the channels between levels) -> global average pool -> linear classifier.

Trained on one process it is plain backprop (memory "standard"); :mod:`revbits.petra` trains the same
modules stage-parallel, inverting the coupling stages (:func:`revbits.petra.pieces.revnet.revnet_pieces`). Sized
for 1x28x28 images (Fashion-MNIST); any image size works since the head pools globally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .output import Output
from .registry import register


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with one group: a per-sample LayerNorm over (C, H, W) (see :class:`RevCouplingBlock` for
    why not BatchNorm). One group per channel (InstanceNorm) removes each channel's mean, which is all
    the global-average-pool head sees, and a toy problem then does not learn at all."""
    return nn.GroupNorm(1, channels)


class RevCouplingBlock(nn.Module):
    """RevNet additive half-coupling with a swap:

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

    def inverse(self, y: Tensor) -> Tensor:
        u, v = y.chunk(2, dim=1)
        return torch.cat([v, u - self.f(v)], dim=1)


class CouplingStage(nn.Module):
    """y = B_n(...B_1(x)) for coupling blocks B_i; ``inverse``: x = B_1^{-1}(...B_n^{-1}(y))."""

    def __init__(self, channels: int, blocks: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RevCouplingBlock(channels) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        for block in reversed(self.blocks):
            y = block.inverse(y)
        return y


class ConvStage(nn.Module):
    """x -> ReLU(norm(conv3x3_stride(x))): the stem and the downsampling stages (not invertible). The layers
    sit in ``self.module`` so that the weights keep the names of revbits 0.1 (``pieces.<i>.module.*``)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.module = nn.Sequential(conv, norm(c_out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class PoolHead(nn.Module):
    """logits = W mean_{h,w}(x) + b: global average pool, then linear."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.mean(dim=(2, 3)))


@dataclass
class RevNetConfig:
    in_channels: int = 1
    channels: int = 16  # of the stem; doubled at each further level
    levels: tuple[int, ...] = (2, 2)  # coupling stages per level
    blocks_per_stage: int = 1
    num_classes: int = 10


def revnet_example(config: RevNetConfig, generator: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    """Four random 8x8 images and random class labels."""
    images = torch.rand(4, config.in_channels, 8, 8, generator=generator)
    return (images,), torch.randint(config.num_classes, (4,), generator=generator)


@register(
    "revnet",
    config=RevNetConfig,
    memory_modes=("standard",),
    tiny=dict(channels=8, levels=(1, 1), num_classes=5),
    example=revnet_example,
)
class RevNet(nn.Module):
    """logits = head(P_n(...P_1(images))) over ``self.pieces``: the stem, the coupling and downsampling
    stages in order, and the :class:`PoolHead`."""

    def __init__(self, config: RevNetConfig) -> None:
        super().__init__()
        self.config = config
        channels = config.channels
        pieces: list[nn.Module] = [ConvStage(config.in_channels, channels, stride=2)]
        for i, n in enumerate(config.levels):
            if i:
                pieces.append(ConvStage(channels, 2 * channels, stride=2))
                channels *= 2
            pieces += [CouplingStage(channels, config.blocks_per_stage) for _ in range(n)]
        pieces.append(PoolHead(channels, config.num_classes))
        self.pieces = nn.ModuleList(pieces)

    def forward(self, images: Tensor, targets: Tensor | None = None) -> Output:
        """Class logits [B, num_classes] for images [B, C, H, W] and, with labels [B], the mean cross-entropy."""
        x = images
        for piece in self.pieces:
            x = piece(x)
        return Output(loss=None if targets is None else F.cross_entropy(x, targets), logits=x)
