"""A revbits ViT (memory="bdia") as PETRA pieces that share its modules:

    stem:   images -> [cls; W_p patches] + P, dropout            (plain: kept in a FIFO)
    BDIA:   entry (block 0), steps 1..K-1                         (invertible: residue bits in flight)
    exit:   (x_{K-1}, x_K) -> x_K                                 (last stage)
    head:   L = cross_entropy(W LayerNorm(x_K[:, 0]), label)      (last stage)

Training the pieces trains the ViT itself, so the weights load into the plain model unchanged.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...models.vit import ViT
from ..stages import LossStage, PlainStage
from . import streams
from .bdia import stack_pieces


class ViTStem(nn.Module):
    """x = ViT.embed(images), as a module that owns only the embedding's parameters."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.patch_embedding, self.dropout = vit.patch_embedding, vit.dropout
        self.cls_token, self.position_embedding = vit.cls_token, vit.position_embedding
        self.embed = vit.embed  # a bound method over the same modules (registers no parameters)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)


class ViTHead(LossStage):
    """L = cross_entropy(head(ln_f(x[:, 0])), label)."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.ln_f, self.head = vit.ln_f, vit.head

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.head(self.ln_f(x[:, 0])), target)


def vit_pieces(vit: ViT, seed: int = 0) -> list[nn.Module]:
    """Stem, BDIA entry and steps, exit and head of ``vit``, whose block stack must be a BDIAStack."""
    pieces, exit_piece = stack_pieces(vit, seed)
    return [PlainStage(ViTStem(vit), seed, streams.plain(0)), *pieces, exit_piece, ViTHead(vit)]


__all__ = ["ViTHead", "ViTStem", "vit_pieces"]
