"""A word-level RNN language model: embedding -> (Rev)GRU or (Rev)LSTM -> linear head.

``memory="standard"`` uses torch's nn.GRU / nn.LSTM; ``memory="reversible"`` uses
:class:`revbits.RevGRU` / :class:`revbits.RevLSTM`, which store only the final state, the
information buffers and the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..revrnn import RevGRU, RevLSTM

RNN_MEMORY_MODES = ("standard", "reversible")
CELLS = ("gru", "lstm")


@dataclass
class RNNLMConfig:
    vocab_size: int
    d_model: int = 256  # embedding and hidden width
    n_layer: int = 1
    cell: str = "gru"
    memory: str = "reversible"
    forget_bits: int | None = 3
    dropout: float = 0.1


def make_rnn(cell: str, memory: str, size: int, layers: int, forget_bits: int | None) -> nn.Module:
    """A batch-first recurrent stack of ``layers`` layers of width ``size``."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if memory not in RNN_MEMORY_MODES:
        raise ValueError(f"an RNN's memory mode is one of {', '.join(RNN_MEMORY_MODES)}, got {memory!r}")
    if memory == "reversible":
        kind = RevGRU if cell == "gru" else RevLSTM
        return kind(size, size, num_layers=layers, forget_bits=forget_bits, batch_first=True)
    kind = nn.GRU if cell == "gru" else nn.LSTM
    return kind(size, size, num_layers=layers, batch_first=True)


class RNNLM(nn.Module):
    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.rnn = make_rnn(config.cell, config.memory, config.d_model, config.n_layer, config.forget_bits)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, vocab] for tokens [B, T], and the mean cross-entropy when targets are given."""
        hidden, _ = self.rnn(self.dropout(self.embedding(tokens)))
        logits = self.head(self.dropout(hidden))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss
