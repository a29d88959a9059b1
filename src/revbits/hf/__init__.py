"""Train a Hugging Face transformers model with a revbits memory mode, and restore it.

Usage::

    from revbits import hf

    hf.convert(model, "bdia")                      # the model's layers now run as one BDIA stack
    ...                                            # train as usual
    hf.restore(model).save_pretrained(directory)   # a plain transformers checkpoint

See docs/hf.md for the supported families and what works in training and at evaluation.
"""

from .convert import convert, is_converted, restore, revbits_stack
from .families import FAMILIES, Family, supported_model_types
from .loss import disable_fused_loss, enable_fused_loss, has_fused_loss, supports_fused_loss

__all__ = [
    "FAMILIES",
    "Family",
    "convert",
    "disable_fused_loss",
    "enable_fused_loss",
    "has_fused_loss",
    "is_converted",
    "restore",
    "revbits_stack",
    "supported_model_types",
    "supports_fused_loss",
]
