"""Standard pre-LN transformer blocks. They know nothing of reversibility.

A block maps x -> x + attn(LN(x)) [+ cross(LN(x), encoded)] + mlp(LN(.)), the shape and dtype of
x unchanged, which is the block protocol every memory mode of :func:`revbits.stack` expects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d_head) [+ mask]) V, self or cross."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.query = nn.Linear(d_model, d_model)
        self.key_value = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, C = x.shape
        source = x if context is None else context
        q = self.query(x)
        k, v = self.key_value(source).split(C, dim=-1)
        q, k, v = (t.view(B, t.shape[1], self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    """W_2 GELU(W_1 x), hidden width ratio * d_model, then dropout."""

    token_wise = True  # its output at a position depends only on its input there (revbits.bdia.token_slices)

    def __init__(self, d_model: int, ratio: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + attn(LN x), then (decoder) + cross(LN x, encoded), then + mlp(LN x).

    Call as ``block(x)``, ``block(x, mask)`` or, with ``cross_attention=True``,
    ``block(x, encoded)`` / ``block(x, encoded, encoded_mask)``, ``encoded`` being the encoder output.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        causal: bool = False,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout, causal)
        self.ln_cross = nn.LayerNorm(d_model) if cross_attention else None
        self.cross = Attention(d_model, n_heads, dropout) if cross_attention else None
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, *args: torch.Tensor | None) -> torch.Tensor:
        if self.cross is None:
            mask = args[0] if args else None
            x = x + self.attn(self.ln_attn(x), mask=mask)
        else:
            if not args:
                raise TypeError("a cross-attention block needs the encoder output: block(x, encoded)")
            encoded, encoded_mask = args[0], args[1] if len(args) > 1 else None
            x = x + self.attn(self.ln_attn(x))
            assert self.ln_cross is not None
            x = x + self.cross(self.ln_cross(x), context=encoded, mask=encoded_mask)
        return x + self.mlp(self.ln_mlp(x))
