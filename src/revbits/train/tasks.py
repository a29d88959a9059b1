"""What the loop trains: a model, its batches, its loss and its evaluation, per model kind.

- ``gpt``: character language modelling (loss, perplexity, bits per character);
- ``vit``: image classification (loss, accuracy);
- ``revnet``: image classification with a small RevNet (trained stage-parallel by ``--parallel petra``);
- ``translator``: sequence-to-sequence translation (loss, perplexity; BLEU in ``revbits eval``);
- ``rnnlm``: word-level language modelling with a (reversible) GRU or LSTM (loss, perplexity);
- ``rnn-translator``: attention seq2seq translation on (reversible) GRUs or LSTMs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import WordTokenizer
from ..io import read_json
from ..models import (
    GPT,
    RNNLM,
    GPTConfig,
    RNNLMConfig,
    RNNTranslator,
    RNNTranslatorConfig,
    Translator,
    TranslatorConfig,
    ViT,
    ViTConfig,
)
from ..petra.revnet import RevNet
from . import datasets as adapters
from .config import ConfigError, TrainConfig
from .hf_task import HFTextTask
from .metrics import perplexity
from .task_base import EVAL_SEED, Task


class CharLMTask(Task):
    """Next-character prediction on a text split into train/valid/test."""

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

    def build_model(self) -> nn.Module:
        c = self.config
        return GPT(
            GPTConfig(
                vocab_size=self.tokenizer.vocab_size,
                block_size=c.block_size,
                n_layer=c.n_layer,
                **_shared_shape(c),
            )
        )

    def _windows(self, data: torch.Tensor, starts: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        offsets = starts[:, None] + torch.arange(self.config.block_size + 1)
        chunk = data[offsets]
        return chunk[:, :-1].to(device), chunk[:, 1:].to(device)

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        data = self.splits["train"]
        starts = torch.randint(len(data) - self.config.block_size - 1, (self.config.batch_size,), generator=sampler)
        return self._windows(data, starts, device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(batch[0], batch[1])[1]

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


class WordLMTask(CharLMTask):
    """Next-word prediction: the text cut into words and punctuation, the 10,000 most frequent
    words of the training split as the vocabulary (the rest map to <unk>), as PTB is used."""

    VOCABULARY = 10_000

    def tokenize(self, data: str):
        splits = adapters.texts(data)
        return splits, WordTokenizer.build([splits["train"]], max_size=self.VOCABULARY)

    def build_model(self) -> nn.Module:
        c = self.config
        return RNNLM(
            RNNLMConfig(
                vocab_size=self.tokenizer.vocab_size,
                d_model=c.d_model,
                n_layer=c.n_layer,
                cell=c.cell,
                memory=c.memory,
                forget_bits=c.forget_bits or None,
                dropout=c.dropout,
            )
        )

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        loss = super().evaluate(model, split)["loss"]
        return {"loss": loss, "perplexity": perplexity(loss)}


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

    def build_model(self) -> nn.Module:
        c = self.config
        _, channels, size, _ = self.splits["train"][0].shape
        return ViT(
            ViTConfig(
                image_size=size,
                patch_size=c.patch_size,
                channels=channels,
                num_classes=self.num_classes,
                n_layer=c.n_layer,
                **_shared_shape(c),
            )
        )

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        images, labels = self.splits["train"]
        index = torch.randint(len(images), (self.config.batch_size,), generator=sampler)
        return images[index].to(device), labels[index].to(device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        images, labels = self.splits[split]
        total_loss, correct = 0.0, 0
        for start in range(0, len(images), 256):
            x, y = images[start : start + 256].to(self.device), labels[start : start + 256].to(self.device)
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(-1) == y).sum())
        return {"loss": total_loss / len(images), "accuracy": correct / len(images)}


class RevNetImageTask(ImageTask):
    """Image classification with a small RevNet (:class:`revbits.petra.RevNet`): a stride-2 stem conv to
    d_model channels, two levels of n_layer coupling stages with a stride-2 conv between them that
    doubles the channels, and a global-average-pool linear head."""

    def build_model(self) -> nn.Module:
        c = self.config
        channels = self.splits["train"][0].shape[1]
        return RevNet(channels, c.d_model, (c.n_layer, c.n_layer), num_classes=self.num_classes)


class TranslationTask(Task):
    """Sentence pairs as padded token batches: source, target input (<bos> ...), target output (... <eos>)."""

    item_name = "tokens"

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        pairs, self.src_tokenizer, self.tgt_tokenizer = adapters.pair_splits(config.data)
        if config.train_subset:
            pairs["train"] = pairs["train"][: config.train_subset]
        limit = config.block_size - 1
        self.splits = {
            split: [(self.src_tokenizer.encode(s)[:limit], self.tgt_tokenizer.encode(t)[:limit]) for s, t in rows]
            for split, rows in pairs.items()
        }
        self.raw = pairs

    def build_model(self) -> nn.Module:
        c = self.config
        layers = max(2, c.n_layer // 2)  # the same in every memory mode (BDIA needs 2 per stack)
        return Translator(
            TranslatorConfig(
                src_vocab=self.src_tokenizer.vocab_size,
                tgt_vocab=self.tgt_tokenizer.vocab_size,
                max_len=c.block_size,
                n_enc_layer=layers,
                n_dec_layer=layers,
                pad_id=self.tgt_tokenizer.pad_id,
                bos_id=self.tgt_tokenizer.bos_id,
                eos_id=self.tgt_tokenizer.eos_id,
                **_shared_shape(c),
            )
        )

    def collate(self, rows: list[tuple[list[int], list[int]]], device: torch.device) -> tuple[torch.Tensor, ...]:
        pad, bos, eos = self.tgt_tokenizer.pad_id, self.tgt_tokenizer.bos_id, self.tgt_tokenizer.eos_id
        src_len = max(len(s) for s, _ in rows)
        tgt_len = max(len(t) for _, t in rows) + 1
        src = torch.full((len(rows), src_len), self.src_tokenizer.pad_id, dtype=torch.long)
        tgt_in = torch.full((len(rows), tgt_len), pad, dtype=torch.long)
        tgt_out = torch.full((len(rows), tgt_len), pad, dtype=torch.long)
        for i, (s, t) in enumerate(rows):
            src[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            tgt_in[i, : len(t) + 1] = torch.tensor([bos, *t], dtype=torch.long)
            tgt_out[i, : len(t) + 1] = torch.tensor([*t, eos], dtype=torch.long)
        return src.to(device), tgt_in.to(device), tgt_out.to(device)

    def train_batch(self, sampler: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        rows = self.splits["train"]
        index = torch.randint(len(rows), (self.config.batch_size,), generator=sampler).tolist()
        return self.collate([rows[i] for i in index], device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return model(*batch)[1]

    def items(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int((batch[2] != self.tgt_tokenizer.pad_id).sum())

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        rows = self.splits[split][: self.config.eval_batches * self.config.batch_size]
        total, count = 0.0, 0
        for start in range(0, len(rows), self.config.batch_size):
            batch = self.collate(rows[start : start + self.config.batch_size], self.device)
            tokens = int((batch[2] != self.tgt_tokenizer.pad_id).sum())
            total += self.loss(model, batch).item() * tokens
            count += tokens
        loss = total / count
        return {"loss": loss, "perplexity": perplexity(loss)}

    def save_assets(self, run_dir: Path) -> None:
        self.src_tokenizer.save(run_dir / "src_tokenizer.json")
        self.tgt_tokenizer.save(run_dir / "tgt_tokenizer.json")


class RNNTranslationTask(TranslationTask):
    """The same sentence pairs, for the attention seq2seq model on (reversible) RNNs."""

    def build_model(self) -> nn.Module:
        c, tokens = self.config, self.tgt_tokenizer
        return RNNTranslator(
            RNNTranslatorConfig(
                src_vocab=self.src_tokenizer.vocab_size,
                tgt_vocab=tokens.vocab_size,
                d_model=c.d_model,
                n_layer=c.n_layer,
                cell=c.cell,
                memory=c.memory,
                forget_bits=c.forget_bits or None,
                attention_slice=c.attention_slice,
                dropout=c.dropout,
                pad_id=tokens.pad_id,
                bos_id=tokens.bos_id,
                eos_id=tokens.eos_id,
            )
        )


def _shared_shape(c: TrainConfig) -> dict:
    """The model options every model config takes alike."""
    return {
        "n_head": c.n_head,
        "d_model": c.d_model,
        "dropout": c.dropout,
        "memory": c.memory,
        "memory_options": c.memory_options,
    }


TASKS: dict[str, type[Task]] = {
    "gpt": CharLMTask,
    "vit": ImageTask,
    "revnet": RevNetImageTask,
    "translator": TranslationTask,
    "rnnlm": WordLMTask,
    "rnn-translator": RNNTranslationTask,
}


def make_task(config: TrainConfig) -> Task:
    if config.model == "hf":  # transformers itself is imported only when the task is built
        return HFTextTask(config)
    return TASKS[config.model](config)


def read_run_config(run_dir: Path) -> TrainConfig:
    """The configuration a run directory was trained with."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a revbits run directory?")
    values = read_json(path, "run configuration")
    if not isinstance(values, dict):
        raise ConfigError(f"{path} is damaged: it holds no table of options")
    return TrainConfig.from_dict(values, source=str(path))
