"""Image classification tasks: a ViT (``vit``) or a small RevNet (``revnet``) (loss, accuracy)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...petra.pieces.revnet import revnet_pieces
from ...petra.pieces.vit import vit_pieces
from .. import datasets as adapters
from ..config import TrainConfig
from ..kinds import PetraCut
from .base import Task, register
from .lm import shared_shape

# PETRA cuts a ViT into its stem, its n_layer blocks and its head (n_layer + 1 stages at most; the stages
# are reversible only under --memory bdia), and a RevNet into its stem, 2 * n_layer coupling stages, the
# downsampling conv and its head (no randomness in a RevNet: the seed is not used).
VIT_PETRA = PetraCut(pieces=vit_pieces, most_stages=lambda config: config.n_layer + 1, memory="bdia")
REVNET_PETRA = PetraCut(
    pieces=lambda model, seed: revnet_pieces(model), most_stages=lambda config: 2 * config.n_layer + 3
)


@register("vit", data="fashion-mnist", help="images, ViT", petra=VIT_PETRA)
class ImageTask(Task):
    """Image classification; images are scaled to [0, 1] and normalised by the training mean and std."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        splits = adapters.image_splits(config.data)
        train_images = splits["train"][0]
        if config.train_subset:
            subset = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(0))[
                : config.train_subset
            ]
            splits["train"] = (splits["train"][0][subset], splits["train"][1][subset])
        pixels = splits["train"][0].float() / 255
        self.mean, self.std = pixels.mean().item(), pixels.std().item()
        self.splits = {k: (self._normalise(x), y) for k, (x, y) in splits.items()}
        self.num_classes = int(max(int(y.max()) for _, y in splits.values())) + 1

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255
        if images.dim() == 3:
            images = images[:, None]
        return (images - self.mean) / self.std

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        _, channels, size, _ = self.splits["train"][0].shape
        return {
            "image_size": size,
            "patch_size": config.patch_size,
            "channels": channels,
            "num_classes": self.num_classes,
            "n_layer": config.n_layer,
            **shared_shape(config),
        }

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        images, labels = self.splits["train"]
        index = torch.randint(len(images), (self.config.batch_size,), generator=sampler)
        return images[index].to(device), labels[index].to(device)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        images, labels = self.splits[split]
        total_loss, correct = 0.0, 0
        for start in range(0, len(images), 256):
            x, y = images[start : start + 256].to(self.device), labels[start : start + 256].to(self.device)
            logits = model(x).logits
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
        return {"loss": total_loss / len(images), "accuracy": correct / len(images)}


@register("revnet", data="fashion-mnist", help="images, RevNet", petra=REVNET_PETRA)
class RevNetImageTask(ImageTask):
    """Image classification with a small RevNet (:class:`revbits.models.RevNet`): a stride-2 stem conv to
    d_model channels, two levels of n_layer coupling stages with a stride-2 conv between them that
    doubles the channels, and a global-average-pool linear head."""

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        return {
            "in_channels": self.splits["train"][0].shape[1],
            "channels": config.d_model,
            "levels": (config.n_layer, config.n_layer),
            "num_classes": self.num_classes,
        }
