"""Plain PyTorch models whose block stacks take ``memory=``; the RNN models take standard or reversible."""

from .blocks import MLP, Attention, TransformerBlock
from .gpt import GPT, GPTConfig
from .rnn import RNNLM, RNNLMConfig
from .rnn_translator import RNNTranslator, RNNTranslatorConfig
from .seq2seq import Translator, TranslatorConfig
from .vit import ViT, ViTConfig

__all__ = [
    "Attention",
    "GPT",
    "GPTConfig",
    "MLP",
    "RNNLM",
    "RNNLMConfig",
    "RNNTranslator",
    "RNNTranslatorConfig",
    "TransformerBlock",
    "Translator",
    "TranslatorConfig",
    "ViT",
    "ViTConfig",
]
