"""Translation tasks on sentence pairs: a Transformer (``translator``) or an attention RNN
(``rnn-translator``) (loss, perplexity; BLEU in ``revbits eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import datasets as adapters
from ..config import TrainConfig
from ..metrics import perplexity
from .base import Task, register
from .lm import shared_shape


@register("translator", data="bible-en-fr", help="sentence pairs, transformer")
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

    def special_ids(self) -> dict[str, int]:
        tokens = self.tgt_tokenizer
        return {"pad_id": tokens.pad_id, "bos_id": tokens.bos_id, "eos_id": tokens.eos_id}

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        layers = max(2, config.n_layer // 2)  # the same in every memory mode (BDIA needs 2 per stack)
        return {
            "src_vocab": self.src_tokenizer.vocab_size,
            "tgt_vocab": self.tgt_tokenizer.vocab_size,
            "max_len": config.block_size,
            "n_enc_layer": layers,
            "n_dec_layer": layers,
            **self.special_ids(),
            **shared_shape(config),
        }

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


@register("rnn-translator", data="bible-en-fr", help="sentence pairs, GRU or LSTM with attention")
class RNNTranslationTask(TranslationTask):
    """The same sentence pairs, for the attention seq2seq model on (reversible) RNNs."""

    def model_options(self, config: TrainConfig) -> dict[str, Any]:
        return {
            "src_vocab": self.src_tokenizer.vocab_size,
            "tgt_vocab": self.tgt_tokenizer.vocab_size,
            "d_model": config.d_model,
            "n_layer": config.n_layer,
            "cell": config.cell,
            "forget_bits": config.forget_bits or None,
            "attention_slice": config.attention_slice,
            "dropout": config.dropout,
            **self.special_ids(),
        }
