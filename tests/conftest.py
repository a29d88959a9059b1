"""Shared helpers for the test suite."""

from __future__ import annotations

import pytest
import torch

from revbits.models import TransformerBlock


def gpt_blocks(depth: int, d_model: int = 32, n_heads: int = 4, dropout: float = 0.0, **kw) -> list:
    """``depth`` small causal pre-LN blocks."""
    return [TransformerBlock(d_model, n_heads, dropout=dropout, causal=True, **kw) for _ in range(depth)]


def random_signs(depth: int, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.randint(0, 2, (depth - 1, batch), generator=generator) * 2 - 1


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=devices)
def device(request) -> str:
    return request.param
