"""Plain PyTorch models; the memory mode is one argument, applied by :func:`revbits.stack` (block stacks)
or :func:`revbits.revrnn.make_rnn` (RNNs).

    model = revbits.models.create("gpt", memory="bdia", vocab_size=65)
    out = model(tokens, targets=next_tokens)        # Output(loss, logits)

Every model follows one forward contract, ``model(*inputs, targets=None) -> Output``: ``inputs`` are one
tensor (tokens or images), or for the translators the source and the target input; ``out.loss`` is the
mean loss (None without targets) and ``out.logits`` the scores (see :class:`Output`).
"""

from .blocks import MLP, Attention, TransformerBlock
from .gpt import GPT, GPTConfig
from .init import init_weights
from .output import Output
from .registry import ModelSpec, create, list_models, memory_modes, model_spec, register
from .revnet import RevNet, RevNetConfig
from .rnn import RNNLM, RNNLMConfig
from .rnn_translator import RNNTranslator, RNNTranslatorConfig
from .seq2seq import Translator, TranslatorConfig
from .vit import ViT, ViTConfig

__all__ = [
    "Attention",
    "GPT",
    "GPTConfig",
    "MLP",
    "ModelSpec",
    "Output",
    "RNNLM",
    "RNNLMConfig",
    "RNNTranslator",
    "RNNTranslatorConfig",
    "RevNet",
    "RevNetConfig",
    "TransformerBlock",
    "Translator",
    "TranslatorConfig",
    "ViT",
    "ViTConfig",
    "create",
    "init_weights",
    "list_models",
    "memory_modes",
    "model_spec",
    "register",
]
