"""An encoder-decoder Transformer for translation whose two block stacks take ``memory=``.

source -> embeddings -> K_enc pre-LN blocks (padding masked) -> LayerNorm = encoded
target -> embeddings -> K_dec causal blocks, each cross-attending to encoded -> LayerNorm -> logits

The decoder blocks receive the encoder output as a block argument, so under BDIA its gradient
flows back through the reversible decoder stack into the encoder.
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
class TranslatorConfig:
    src_vocab: int
    tgt_vocab: int
    max_len: int = 128
    n_enc_layer: int = 3
    n_dec_layer: int = 3
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    memory: str = "standard"
    memory_options: dict[str, Any] = field(default_factory=dict)


def translation_example(
    config: TranslatorConfig, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Three random source sentences (one padded) and target sentences: inputs (source, target input),
    targets the target shifted by one. Token ids from 3 up: 0, 1 and 2 are padding, <bos> and <eos>."""
    src = torch.randint(3, config.src_vocab, (3, 7), generator=generator)
    src[0, 5:] = config.pad_id
    tgt = torch.randint(3, config.tgt_vocab, (3, 6), generator=generator)
    return (src, tgt[:, :-1]), tgt[:, 1:]


@register(
    "translator",
    config=TranslatorConfig,
    memory_modes=MEMORY_MODES,
    tiny=dict(src_vocab=13, tgt_vocab=11, max_len=16, n_enc_layer=2, n_dec_layer=3, n_head=2, d_model=16),
    example=translation_example,
)
class Translator(nn.Module):
    def __init__(self, config: TranslatorConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.src_embedding = nn.Embedding(config.src_vocab, d)
        self.tgt_embedding = nn.Embedding(config.tgt_vocab, d)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.dropout = nn.Dropout(config.dropout)
        encoder = [TransformerBlock(d, config.n_head, dropout=config.dropout) for _ in range(config.n_enc_layer)]
        decoder = [
            TransformerBlock(d, config.n_head, dropout=config.dropout, causal=True, cross_attention=True)
            for _ in range(config.n_dec_layer)
        ]
        self.encoder = stack(encoder, memory=config.memory, **config.memory_options)
        self.decoder = stack(decoder, memory=config.memory, **config.memory_options)
        self.ln_enc = nn.LayerNorm(d)
        self.ln_dec = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.tgt_vocab, bias=False)
        self.head.weight = self.tgt_embedding.weight
        self.apply(init_weights)

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.config.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.config.max_len}")
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.dropout(table(tokens) + self.position_embedding(positions))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output [B, S, d] and the key mask [B, 1, 1, S] (True where the source is not padding)."""
        mask = (src != self.config.pad_id)[:, None, None, :]
        return self.ln_enc(self.encoder(self._embed(self.src_embedding, src), mask)), mask

    def decode(self, tgt_in: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, tgt_vocab] of the next target token at every position."""
        return self.head(self.ln_dec(self.decoder(self._embed(self.tgt_embedding, tgt_in), encoded, mask)))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """Logits [B, T, tgt_vocab] of the next token after each of ``tgt_in`` given ``src`` and, with
        ``targets`` (the target sentences shifted by one, [B, T]), the cross-entropy averaged over
        non-padding targets."""
        logits = self.decode(tgt_in, *self.encode(src))
        if targets is None:
            return Output(logits=logits)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=self.config.pad_id
        )
        return Output(loss=loss, logits=logits)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int = 64) -> list[list[int]]:
        """Greedy decoding: the most probable token at each step, until <eos> or ``max_len``."""
        encoded, mask = self.encode(src)
        out = torch.full((src.shape[0], 1), self.config.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        for _ in range(min(max_len, self.config.max_len - 1)):
            token = self.decode(out, encoded, mask)[:, -1].argmax(-1)
            token = token.masked_fill(done, self.config.pad_id)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == self.config.eos_id
            if bool(done.all()):
                break
        return [self._strip(row) for row in out[:, 1:].tolist()]

    @torch.no_grad()
    def beam(
        self, src: torch.Tensor, beam_size: int = 4, max_len: int = 64, length_penalty: float = 0.6
    ) -> list[list[int]]:
        """Beam search per sentence; hypotheses are ranked by log p / ((5 + len) / 6) ** length_penalty."""
        results = []
        for sentence in src:
            encoded, mask = self.encode(sentence[None])
            beams: list[tuple[float, list[int]]] = [(0.0, [self.config.bos_id])]
            finished: list[tuple[float, list[int]]] = []
            for _ in range(min(max_len, self.config.max_len - 1)):
                tokens = torch.tensor([b[1] for b in beams], device=src.device)
                logp = F.log_softmax(
                    self.decode(tokens, encoded.expand(len(beams), -1, -1), mask.expand(len(beams), -1, -1, -1))[:, -1],
                    dim=-1,
                )
                scores = torch.tensor([b[0] for b in beams], device=src.device)[:, None] + logp
                top = torch.topk(scores.flatten(), beam_size)
                beams = []
                for score, index in zip(top.values.tolist(), top.indices.tolist()):
                    row, token = divmod(index, logp.shape[1])
                    hypothesis = (score, tokens[row].tolist() + [token])
                    (finished if token == self.config.eos_id else beams).append(hypothesis)
                if not beams or len(finished) >= beam_size:
                    break
            finished = finished or beams

            def rank(h: tuple[float, list[int]]) -> float:
                return h[0] / ((5 + len(h[1])) / 6) ** length_penalty

            results.append(self._strip(max(finished, key=rank)[1][1:]))
        return results

    def _strip(self, tokens: list[int]) -> list[int]:
        return strip_special(tokens, self.config.eos_id, self.config.pad_id)


def strip_special(tokens: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Cut at the first <eos> and drop padding."""
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
    return [t for t in tokens if t != pad_id]
