"""An attention seq2seq translator on (reversible) GRUs or LSTMs (MacKay et al. 2018, section 5).

    source -> embedding e_s -> encoder RNN -> final state, top states h_s
    context k_s = [e_s; h_s[:slice]]     (the slice is the only part of h_s kept in memory)
    target -> embedding -> decoder RNN (from the encoder's final state) -> q_t
    a_t = softmax_s(q_t^T W k_s),  c_t = sum_s a_t,s k_s,  o_t = tanh(W_c [c_t; q_t]),
    p(y_t) = softmax(W_o o_t)                          (Luong "general" attention, no input feeding)

``memory`` goes to :func:`revbits.revrnn.make_rnn`. With ``"reversible"`` the encoder keeps only its
buffer, its inputs and the attention slice; the decoder computes attention and loss per step inside its
reversible loop (a readout, :func:`revbits.revrnn.run_readout`), so neither keeps its hidden states.
``"standard"`` runs the same model on nn.GRU/nn.LSTM. Trained with targets, the model never forms the
[B, T, vocab] logits, so its Output has ``logits=None``; called without targets it returns them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..revrnn.switch import RNN_MEMORY_MODES, make_rnn, run_readout
from ..rng import derive_seed
from .output import Output
from .registry import register
from .seq2seq import strip_special


def check_attention_slice(attention_slice: int, d_model: int) -> None:
    """A ValueError unless the attention reads ``0 <= attention_slice <= d_model`` units of the top
    encoder state."""
    if not 0 <= attention_slice <= d_model:
        raise ValueError(f"attention_slice must be from 0 to d_model ({d_model}), got {attention_slice}")


@dataclass
class RNNTranslatorConfig:
    src_vocab: int
    tgt_vocab: int
    d_model: int = 256  # embedding and hidden width
    n_layer: int = 1
    cell: str = "gru"
    memory: str = "reversible"
    forget_bits: int | None = 3
    attention_slice: int = 32  # units of the top encoder state the attention reads
    dropout: float = 0.2
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        check_attention_slice(self.attention_slice, self.d_model)


def step_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, t: int, salt: int) -> torch.Tensor:
    """Inverted dropout whose mask depends only on (seed, t, salt): a step re-run in the
    reversible backward draws the same mask as the forward did."""
    if p == 0:
        return x
    generator = torch.Generator(device=x.device).manual_seed(derive_seed(int(seed), 2 * t + salt))
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1 - p)


class AttentionReadout(nn.Module):
    """Attention over [source embedding; encoder slice], then the output layer and the loss of one
    decoder step; a readout of the decoder RNN (see :mod:`revbits.revrnn.layers`)."""

    def __init__(self, hidden: int, embedding: int, slice_width: int, vocab: int, dropout: float, pad_id: int):
        super().__init__()
        self.embedding_width, self.dropout, self.pad_id = embedding, dropout, pad_id
        self.query = nn.Linear(hidden, embedding + slice_width, bias=False)  # W of q^T W k
        self.combine = nn.Linear(embedding + slice_width + hidden, hidden)
        self.head = nn.Linear(hidden, vocab)

    def attend(self, q: torch.Tensor, src_emb: torch.Tensor, src_slice: torch.Tensor, src_mask: torch.Tensor):
        """o = tanh(W_c [c; q]) for queries q [B, H] over keys [B, S, d + slice] (given in two parts)."""
        key_query = self.query(q)
        q_emb, q_slice = key_query[:, : self.embedding_width, None], key_query[:, self.embedding_width :, None]
        scores = torch.bmm(src_emb, q_emb).squeeze(-1)
        if src_slice.shape[-1]:
            scores = scores + torch.bmm(src_slice, q_slice).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~src_mask, float("-inf")), -1)[:, None]
        context = [torch.bmm(weights, src_emb).squeeze(1), torch.bmm(weights, src_slice).squeeze(1)]
        return torch.tanh(self.combine(torch.cat([*context, q], -1)))

    def logits(self, q, src_emb, src_slice, src_mask) -> torch.Tensor:
        return self.head(self.attend(q, src_emb, src_slice, src_mask))

    def forward(self, q, t, src_emb, src_slice, src_mask, targets, seed) -> torch.Tensor:
        """The cross-entropy of step t per sequence ([B]; 0 where the target is padding)."""
        if self.training:
            q = step_dropout(q, self.dropout, seed, t, 0)
        attended = self.attend(q, src_emb, src_slice, src_mask)
        if self.training:
            attended = step_dropout(attended, self.dropout, seed, t, 1)
        return F.cross_entropy(self.head(attended), targets[t], ignore_index=self.pad_id, reduction="none")


def rnn_translation_example(
    config: RNNTranslatorConfig, generator: torch.Generator
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Three random source sentences (one padded) and target sentences (one padded): inputs (source,
    target input), targets the target shifted by one. Token ids from 3 up (0-2 are special)."""
    src = torch.randint(3, config.src_vocab, (3, 7), generator=generator)
    src[1, 4:] = config.pad_id
    tgt = torch.randint(3, config.tgt_vocab, (3, 6), generator=generator)
    tgt[2, 4:] = config.pad_id
    return (src, tgt[:, :-1]), tgt[:, 1:]


@register(
    "rnn-translator",
    config=RNNTranslatorConfig,
    memory_modes=RNN_MEMORY_MODES,
    tiny=dict(src_vocab=13, tgt_vocab=11, d_model=16, n_layer=2, attention_slice=4),
    example=rnn_translation_example,
    shared_weights=False,
)
class RNNTranslator(nn.Module):
    def __init__(self, config: RNNTranslatorConfig) -> None:
        super().__init__()
        self.config = c = config
        self.src_embedding = nn.Embedding(c.src_vocab, c.d_model)
        self.tgt_embedding = nn.Embedding(c.tgt_vocab, c.d_model)
        self.encoder = make_rnn(c.cell, c.memory, c.d_model, c.n_layer, c.forget_bits)
        self.decoder = make_rnn(c.cell, c.memory, c.d_model, c.n_layer, c.forget_bits)
        self.readout = AttentionReadout(c.d_model, c.d_model, c.attention_slice, c.tgt_vocab, c.dropout, c.pad_id)
        self.dropout = nn.Dropout(c.dropout)

    def encode(self, src: torch.Tensor):
        """(source embeddings [B, S, d], attention slice [B, S, slice], key mask [B, S], final state)."""
        src_mask = src != self.config.pad_id
        lengths = src_mask.sum(1)
        if bool((lengths == 0).any()):
            raise ValueError("a source sentence is empty (all padding)")
        src_emb = self.dropout(self.src_embedding(src))
        packed = pack_padded_sequence(src_emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, final = self.encoder(packed)
        hidden, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        # a copy: only the slice, not the whole top state, stays alive for the attention
        return src_emb, hidden[..., : self.config.attention_slice].contiguous(), src_mask, final

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor | None = None) -> Output:
        """With ``targets`` (the target sentences shifted by one, [B, T]), the cross-entropy averaged
        over non-padding targets and no logits; without, the logits [B, T, tgt_vocab] of the next token
        after each of ``tgt_in`` and no loss."""
        if targets is None:
            src_emb, src_slice, src_mask, final = self.encode(src)
            out, _ = self.decoder(self.dropout(self.tgt_embedding(tgt_in)), final)
            steps = [self.readout.logits(out[:, t], src_emb, src_slice, src_mask) for t in range(out.shape[1])]
            return Output(logits=torch.stack(steps, 1))
        losses = self.token_losses(src, tgt_in, targets)
        return Output(loss=losses.sum() / (targets != self.config.pad_id).sum())

    def token_losses(self, src: torch.Tensor, tgt_in: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The cross-entropy of every target token, [B, T] (0 where the target is padding)."""
        src_emb, src_slice, src_mask, final = self.encode(src)
        tgt_emb = self.dropout(self.tgt_embedding(tgt_in))
        seed = torch.randint(2**31, (), dtype=torch.int64)  # the readout's dropout masks, per batch
        inputs = (src_emb, src_slice, src_mask, targets.t(), seed)
        lengths = (targets != self.config.pad_id).sum(1)
        return run_readout(self.decoder, tgt_emb, final, self.readout, inputs, lengths)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: int = 64) -> list[list[int]]:
        """The most probable token at each step, until <eos> or ``max_len``."""
        src_emb, src_slice, src_mask, state = self.encode(src)
        token = torch.full((src.shape[0],), self.config.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        rows: list[torch.Tensor] = []
        for _ in range(max_len):
            out, state = self.decoder(self.tgt_embedding(token)[:, None], state)
            token = self.readout.logits(out[:, 0], src_emb, src_slice, src_mask).argmax(-1)
            token = token.masked_fill(done, self.config.pad_id)
            rows.append(token)
            done |= token == self.config.eos_id
            if bool(done.all()):
                break
        return [strip_special(row, self.config.eos_id, self.config.pad_id) for row in torch.stack(rows, 1).tolist()]

    def beam(self, src: torch.Tensor, beam_size: int = 4, max_len: int = 64, length_penalty: float = 0.6):
        raise ValueError("the rnn-translator decodes greedily only: use --decode greedy")
