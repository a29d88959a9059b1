"""What every revbits model returns: ``model(*inputs, targets=None) -> Output``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import torch
from torch.utils import _pytree


@dataclass(frozen=True)
class Output:
    """A model's result.

    - ``loss``: the mean loss over the targets (a scalar), or None when no targets were given;
    - ``logits``: the unnormalised scores, e.g. [B, T, vocab] or [B, classes], or None where a model
      never materialises them with targets given (the RNN translator computes its per-step losses
      inside the reversible loop; called without targets it returns its logits).

    It is a pytree node (as Hugging Face's ModelOutput is), so wrappers that walk a model's outputs for
    tensors (FSDP, DDP, torch.compile) find its loss and logits. An Output is not a tuple:
    ``logits, loss = model(x, y)`` raises instead of silently binding the wrong names (models of
    revbits 0.1 returned ``(logits, loss)``). Use ``out.logits`` and ``out.loss``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    def __iter__(self) -> NoReturn:
        raise TypeError(
            "a revbits model returns an Output, not a tuple: use out.logits and out.loss "
            "(models of revbits 0.1 returned (logits, loss))"
        )


_pytree.register_pytree_node(
    Output,
    lambda out: ([out.loss, out.logits], None),
    lambda children, _: Output(*children),
    serialized_type_name="revbits.models.Output",
)
