"""A Vision Transformer for image classification whose block stack takes ``memory=``.

image -> non-overlapping patches -> linear embedding, a cls token and position embeddings ->
dropout -> K pre-LN blocks -> LayerNorm of the cls token -> linear classifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..modes import MEMORY_MODES, stack
from .blocks import TransformerBlock
from .init import init_weights
from .output import Output
from .registry import register


@dataclass
class ViTConfig:
    image_size: int = 28
    patch_size: int = 4
    channels: int = 1
    num_classes: int = 10
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1
    memory: str = "standard"
    memory_options: dict[str, Any] = field(default_factory=dict)


def image_example(config: ViTConfig, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Four random images of the configured shape and random class labels."""
    images = torch.rand(4, config.channels, config.image_size, config.image_size, generator=generator)
    return (images,), torch.randint(config.num_classes, (4,), generator=generator)


@register(
    "vit",
    config=ViTConfig,
    memory_modes=MEMORY_MODES,
    tiny=dict(image_size=8, patch_size=4, channels=1, num_classes=5, n_layer=3, n_head=2, d_model=16),
    example=image_example,
)
class ViT(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Linear(config.channels * config.patch_size**2, config.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, config.d_model) * 0.02)
        self.dropout = nn.Dropout(config.dropout)
        blocks = [
            TransformerBlock(config.d_model, config.n_head, dropout=config.dropout) for _ in range(config.n_layer)
        ]
        self.stack = stack(blocks, memory=config.memory, **config.memory_options)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.num_classes)
        self.apply(init_weights)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), C p p], patches in row-major order."""
        B, C, H, W = images.shape
        p = self.config.patch_size
        if (C, H, W) != (self.config.channels, self.config.image_size, self.config.image_size):
            raise ValueError(
                f"expected images of shape [B, {self.config.channels}, {self.config.image_size}, "
                f"{self.config.image_size}], got {list(images.shape)}"
            )
        x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // p) * (W // p), C * p * p)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """x = dropout([cls; W_p patches(images)] + P), the input of the block stack."""
        x = self.patch_embedding(self.patches(images))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embedding
        return self.dropout(x)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Class logits [B, num_classes] for float images [B, C, H, W] and, with integer labels
        ``targets`` [B], the mean cross-entropy."""
        x = self.stack(self.embed(images))
        logits = self.head(self.ln_f(x[:, 0]))
        return Output(loss=None if targets is None else F.cross_entropy(logits, targets), logits=logits)
