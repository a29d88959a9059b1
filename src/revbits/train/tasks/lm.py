"""Language modelling tasks: characters with a GPT (``gpt``), words with a (reversible) RNN (``rnnlm``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data import WordTokenizer
from .. import datasets as adapters
from ..config import ConfigError, TrainConfig
from ..metrics import perplexity
from .base import EVAL_SEED, Task, register


@register("gpt", data="shakespeare", help="characters, GPT")
class CharLMTask(Task):
    """Next-character prediction on a text split into train/valid/test (loss, perplexity, bits per character)."""

    item_name = "tokens"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        texts, self.tokenizer = self.tokenize(config.data)
        self.splits = {
            name: torch.tensor(self.tokenizer.encode(text), dtype=torch.long) for name, text in texts.items()
        }
        if config.train_subset:
            self.splits["train"] = self.splits["train"][: config.train_subset]
        shortest = min(len(t) for t in self.splits.values())
        if shortest <= config.block_size + 1:
            raise ConfigError(f"a split of {config.data} has {shortest} tokens, fewer than block_size + 2")

    def tokenize(self, data: str):
        return adapters.text_splits(data)

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "block_size": config.block_size,
            "n_layer": config.n_layer,
            **shared_shape(config),
        }

    def _windows(self, data: torch.Tensor, starts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        offsets = starts[:, None] + torch.arange(self.config.block_size + 1)
        chunk = data[offsets]
        return chunk[:, :-1].to(device), chunk[:, 1:].to(device)

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        data = self.splits["train"]
        starts = torch.randint(len(data) - self.config.block_size - 1, (self.config.batch_size,), generator=sampler)
        return self._windows(data, starts, device)

    def items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        data, generator = self.splits[split], torch.Generator().manual_seed(EVAL_SEED)
        losses = []
        for _ in range(self.config.eval_batches):
            starts = torch.randint(
                len(data) - self.config.block_size - 1, (self.config.batch_size,), generator=generator
            )
            losses.append(self.loss(model, self._windows(data, starts, self.device)).item())
        loss = sum(losses) / len(losses)
        return {"loss": loss, "perplexity": perplexity(loss), "bits_per_char": loss / math.log(2)}

    def save_assets(self, run_dir: Path) -> None:
        self.tokenizer.save(run_dir / "tokenizer.json")


@register("rnnlm", data="shakespeare", help="words, GRU or LSTM")
class WordLMTask(CharLMTask):
    """Next-word prediction: the text cut into words and punctuation, the 10,000 most frequent
    words of the training split as the vocabulary (the rest map to <unk>), as PTB is used."""

    VOCABULARY = 10_000

    def tokenize(self, data: str):
        splits = adapters.texts(data)
        return splits, WordTokenizer.build([splits["train"]], max_size=self.VOCABULARY)

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        return {
            "vocab_size": self.tokenizer.vocab_size,
            "d_model": config.d_model,
            "n_layer": config.n_layer,
            "cell": config.cell,
            "forget_bits": config.forget_bits or None,
            "dropout": config.dropout,
        }

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        loss = super().evaluate(model, split)["loss"]
        return {"loss": loss, "perplexity": perplexity(loss)}


def shared_shape(config: TrainConfig) -> dict[str, Any]:
    """The model options every block-stack model (gpt, vit, translator) takes alike."""
    return {
        "n_head": config.n_head,
        "d_model": config.d_model,
        "dropout": config.dropout,
        "memory_options": config.memory_options,
    }
