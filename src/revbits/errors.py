"""Errors shared by revbits' reversible engines (BDIA stacks and the reversible RNNs)."""

from __future__ import annotations

__all__ = ["ReversibilityError"]


class ReversibilityError(RuntimeError):
    """A state rebuilt in the backward pass differs from the one the forward pass produced: the forward and the
    backward's reversal computed different bits, so the gradients would be wrong."""
