"""transformers' own activation checkpointing on a converted model: asked for, honoured by the stack.

transformers checkpoints a layer when its ``gradient_checkpointing`` flag is set
(``model.gradient_checkpointing_enable()``, ``TrainingArguments(gradient_checkpointing=True)``, TRL's
default ``SFTConfig``). On a converted model the layers run inside a revbits stack, which already
decides what is kept for backward (BDIA keeps two states and a few bits per element, ``"checkpoint"``
each layer's input), so checkpointing each layer again on top would only recompute it a second time.
The converted layer classes therefore read the flag as False and record the request instead: one
info line says so, and :func:`revbits.hf.restore` gives the request back to the plain layers.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

logger = logging.getLogger("revbits.hf")

FLAG = "gradient_checkpointing"
_REQUEST = "_revbits_checkpointing"  # the value the flag was set to while converted (None: never set)


def _layer_flag(layer: nn.Module) -> bool:
    """What transformers' checkpointing wrapper of a converted layer reads: never checkpoint here."""
    return False


def _record_request(layer: nn.Module, value: Any) -> None:
    layer.__dict__[_REQUEST] = value
    if value:
        layer.__dict__["_revbits_conversion"].note_checkpointing_request()


#: The ``gradient_checkpointing`` attribute of a converted layer class whose plain class has one.
CHECKPOINTING_FLAG = property(_layer_flag, _record_request, doc=_layer_flag.__doc__)


def take_request(layer: nn.Module) -> bool:
    """At conversion: move the layer's own flag (transformers sets it on the instance) aside, so the
    converted class's property answers; returns whether checkpointing was on."""
    value = layer.__dict__.pop(FLAG, None)
    layer.__dict__[_REQUEST] = value
    return bool(value)


def give_back_request(layer: nn.Module) -> None:
    """At restore: the plain layer gets the flag as it was last set, so a request made while converted
    is honoured by the plain model."""
    value = layer.__dict__.pop(_REQUEST, None)
    if value is not None:
        layer.__dict__[FLAG] = value


def log_request(memory: str) -> None:
    """The one info line for a checkpointing request on a model converted with ``memory``."""
    what = {
        "standard": "memory='standard' keeps every activation (convert with memory='checkpoint' to recompute them)",
        "checkpoint": "memory='checkpoint' already checkpoints every layer",
        "mesa": "memory='mesa' already keeps the activations as 8-bit codes",
    }.get(memory, f"memory={memory!r} already rebuilds every layer input in backward instead of storing it")
    logger.info(
        "revbits.hf: activation checkpointing was requested on a converted model; its layers run as one revbits "
        "stack, and %s, so transformers' checkpointing is not added on top",
        what,
    )
