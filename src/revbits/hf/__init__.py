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

__all__ = ["FAMILIES", "Family", "convert", "is_converted", "restore", "revbits_stack", "supported_model_types"]
