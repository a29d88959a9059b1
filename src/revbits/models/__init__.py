"""Plain PyTorch models whose block stacks take ``memory=``."""

from .blocks import MLP, Attention, TransformerBlock

__all__ = ["Attention", "MLP", "TransformerBlock"]
