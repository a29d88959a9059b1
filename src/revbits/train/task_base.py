"""What every training task provides to the loop: a model, batches, a loss and an evaluation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig

EVAL_SEED = 1234  # evaluation batches are the same in every run and at every step


class Task(ABC):
    item_name = "samples"

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]: ...

    def items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].shape[0]

    def save_assets(self, run_dir: Path) -> None:  # noqa: B027 (optional hook; images need nothing)
        """Write what evaluation and sampling need besides the weights (vocabularies)."""

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)
