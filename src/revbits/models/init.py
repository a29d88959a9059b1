"""The weight initialisation every revbits model applies: ``model.apply(init_weights)``."""

from __future__ import annotations

from torch import nn


def init_weights(module: nn.Module) -> None:
    """W ~ N(0, 0.02^2) for linear and embedding weights, b = 0 for linear biases (GPT-2's initialisation);
    other modules keep their own."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
