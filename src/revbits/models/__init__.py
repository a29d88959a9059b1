"""Plain PyTorch models whose block stacks take ``memory=``; the RNN LM takes standard or reversible."""

from .blocks import MLP, Attention, TransformerBlock
from .gpt import GPT, GPTConfig
from .rnn import RNNLM, RNNLMConfig
from .seq2seq import Translator, TranslatorConfig
from .vit import ViT, ViTConfig

__all__ = [
    "Attention",
    "GPT",
    "GPTConfig",
    "MLP",
    "RNNLM",
    "RNNLMConfig",
    "TransformerBlock",
    "Translator",
    "TranslatorConfig",
    "ViT",
    "ViTConfig",
]
