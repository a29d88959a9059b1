"""One switch for every model: run a list of residual blocks under a memory mode.

``stack(blocks, memory=...)`` returns a module whose state dict is ``blocks.<i>.*`` in every
mode, so weights trained in one mode load into any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .bdia import BDIAStack

MEMORY_MODES = ("standard", "checkpoint", "bdia")


class SequentialStack(nn.Module):
    """x_{k+1} = block_k(x_k, *args), with every activation kept for backward (plain autograd)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, *args)
        return x


class CheckpointStack(SequentialStack):
    """The same sequence with non-reentrant ``torch.utils.checkpoint`` around every block.

    Only each block's input is kept; its internals are recomputed in backward.
    """

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x, *args)
        for block in self.blocks:
            x = checkpoint(block, x, *args, use_reentrant=False)
        return x


def stack(blocks: Sequence[nn.Module], memory: str = "standard", **options: Any) -> nn.Module:
    """Wrap ``blocks`` in the memory mode ``memory``.

    - ``"standard"``: plain autograd, every activation stored.
    - ``"checkpoint"``: each block's input stored, internals recomputed (torch.utils.checkpoint).
    - ``"bdia"``: :class:`~revbits.BDIAStack`, 1 bit per element per block; ``options`` go to it.
    """
    if memory == "bdia":
        return BDIAStack(blocks, **options)
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}")
    if options:
        raise TypeError(f"option(s) {', '.join(sorted(options))} apply only to memory='bdia', not {memory!r}")
    return CheckpointStack(blocks) if memory == "checkpoint" else SequentialStack(blocks)
