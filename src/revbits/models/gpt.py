"""A GPT language model (nanoGPT-style) whose block stack takes ``memory=``.

tokens -> token + position embeddings -> dropout -> K causal pre-LN blocks -> LayerNorm ->
logits (the output projection shares the token embedding). With targets the loss is computed by
:func:`revbits.losses.linear_cross_entropy`, chunk by chunk, so the logits are never held for backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import linear_cross_entropy
from ..modes import MEMORY_MODES, stack
from .blocks import TransformerBlock
from .init import init_weights
from .output import Output
from .registry import register


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.1
    memory: str = "standard"
    memory_options: dict[str, Any] = field(default_factory=dict)


def lm_example(config: GPTConfig, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Three random token windows (inputs) and the same shifted by one (targets)."""
    tokens = torch.randint(config.vocab_size, (3, min(config.block_size, 12) + 1), generator=generator)
    return (tokens[:, :-1],), tokens[:, 1:]


@register(
    "gpt",
    config=GPTConfig,
    memory_modes=MEMORY_MODES,
    tiny=dict(vocab_size=17, block_size=12, n_layer=3, n_head=2, d_model=16),
    example=lm_example,
)
class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        blocks = [
            TransformerBlock(config.d_model, config.n_head, dropout=config.dropout, causal=True)
            for _ in range(config.n_layer)
        ]
        self.stack = stack(blocks, memory=config.memory, **config.memory_options)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(init_weights)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """x = dropout(E[idx] + P[0..T-1]) for tokens ``idx`` [B, T], the input of the block stack."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        positions = torch.arange(T, device=idx.device)
        return self.dropout(self.token_embedding(idx) + self.position_embedding(positions))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Without targets: the logits [B, T, vocab]. With targets [B, T]: the mean cross-entropy over all
        positions (targets of -100 ignored), computed in chunks of positions (the fused linear cross-entropy,
        equal to the plain loss up to rounding), and no logits: ``Output(loss=loss, logits=None)``."""
        hidden = self.ln_f(self.stack(self.embed(idx)))
        if targets is None:
            return Output(logits=self.head(hidden))
        return Output(loss=linear_cross_entropy(hidden, self.head, targets))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` tokens, each sampled from softmax(logits / temperature) (top-k)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits = self(context).logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


_init_weights = init_weights  # Deprecated: moved to revbits.models.init.init_weights; this alias goes in 0.3
