"""A word-level RNN language model: embedding -> (Rev)GRU or (Rev)LSTM -> linear head.

``memory`` goes to :func:`revbits.revrnn.make_rnn`: ``"standard"`` builds torch's nn.GRU / nn.LSTM,
``"reversible"`` :class:`revbits.RevGRU` / :class:`revbits.RevLSTM`, which store only the final state,
the information buffers and the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..revrnn.switch import CELLS, RNN_MEMORY_MODES, make_rnn
from .output import Output
from .registry import register

# CELLS, RNN_MEMORY_MODES, make_rnn: Deprecated here: moved to revbits.revrnn.switch; these aliases go in 0.3
__all__ = ["CELLS", "RNNLM", "RNNLMConfig", "RNN_MEMORY_MODES", "make_rnn"]


@dataclass
class RNNLMConfig:
    vocab_size: int
    d_model: int = 256  # embedding and hidden width
    n_layer: int = 1
    cell: str = "gru"
    memory: str = "reversible"
    forget_bits: int | None = 3
    dropout: float = 0.1


def word_example(config: RNNLMConfig, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Three random token sequences (inputs) and the same shifted by one (targets)."""
    tokens = torch.randint(config.vocab_size, (3, 9), generator=generator)
    return (tokens[:, :-1],), tokens[:, 1:]


@register(
    "rnnlm",
    config=RNNLMConfig,
    memory_modes=RNN_MEMORY_MODES,
    tiny=dict(vocab_size=17, d_model=16, n_layer=2),
    example=word_example,
    shared_weights=False,
)
class RNNLM(nn.Module):
    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.rnn = make_rnn(config.cell, config.memory, config.d_model, config.n_layer, config.forget_bits)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.d_model, config.vocab_size)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Logits [B, T, vocab] for tokens [B, T] and, with targets [B, T], the mean cross-entropy."""
        hidden, _ = self.rnn(self.dropout(self.embedding(tokens)))
        logits = self.head(self.dropout(hidden))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return Output(loss=loss, logits=logits)
