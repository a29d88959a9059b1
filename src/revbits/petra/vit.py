"""A revbits ViT (memory="bdia") as PETRA pieces that share its modules:

    stem:   images -> [cls; W_p patches] + P, dropout            (plain: kept in a FIFO)
    BDIA:   entry (block 0), steps 1..K-1                         (reversible: residue bits in flight)
    exit:   (x_{K-1}, x_K) -> x_K                                 (last stage)
    head:   L = cross_entropy(W LayerNorm(x_K[:, 0]), label)      (last stage)

Training the pieces trains the ViT itself, so the weights load into the plain model unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bdia import BDIAStack
from ..models.vit import ViT
from .bdia_pieces import bdia_pieces
from .stages import LossStage, PlainStage


class ViTStem(nn.Module):
    """x = dropout([cls; W_p patches(images)] + P): the ViT's input, owning only those parameters."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.patch_embedding, self.dropout = vit.patch_embedding, vit.dropout
        self.cls_token, self.position_embedding = vit.cls_token, vit.position_embedding
        self.patches = vit.patches  # the ViT's own shape check and patch cutting (a bound method, no parameters)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embedding(self.patches(images))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        return self.dropout(x)


class ViTHead(LossStage):
    """L = cross_entropy(head(ln_f(x[:, 0])), label)."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.ln_f, self.head = vit.ln_f, vit.head

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.head(self.ln_f(x[:, 0])), target)


def vit_pieces(vit: ViT, seed: int = 0) -> list[nn.Module]:
    """Stem, BDIA entry and steps, exit and head of ``vit``, whose block stack must be a BDIAStack."""
    if not isinstance(vit.stack, BDIAStack):
        raise ValueError(f"PETRA needs the ViT's blocks in a BDIAStack (memory='bdia'), got {type(vit.stack).__name__}")
    stem = PlainStage(ViTStem(vit), seed)
    pieces, exit_piece = bdia_pieces(list(vit.stack.blocks), vit.stack.bits, vit.stack.gamma, seed)
    return [stem, *pieces, exit_piece, ViTHead(vit)]
