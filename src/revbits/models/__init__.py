"""Plain PyTorch models whose block stacks take ``memory=`` (standard, checkpoint, bdia)."""

from .blocks import MLP, Attention, TransformerBlock
from .gpt import GPT, GPTConfig
from .seq2seq import Translator, TranslatorConfig
from .vit import ViT, ViTConfig

__all__ = [
    "Attention",
    "GPT",
    "GPTConfig",
    "MLP",
    "TransformerBlock",
    "Translator",
    "TranslatorConfig",
    "ViT",
    "ViTConfig",
]
