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
from .mesa import Compressor, MesaConfig

MEMORY_MODES = ("standard", "checkpoint", "mesa", "bdia", "bdia+mesa")


class SequentialStack(nn.Module):
    """x_{k+1} = block_k(x_k, *args, **kwargs), with every activation kept for backward (plain autograd)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, *args, **kwargs)
        return x


class CheckpointStack(SequentialStack):
    """The same sequence with non-reentrant ``torch.utils.checkpoint`` around every block.

    Only each block's input is kept; its internals are recomputed in backward.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x, *args, **kwargs)
        for block in self.blocks:
            x = checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        return x


class MesaStack(SequentialStack):
    """The same sequence with every activation saved for backward kept as 8-bit codes
    (:mod:`revbits.mesa`). ``stack.compressor.report`` describes the last training forward."""

    def __init__(self, blocks: Sequence[nn.Module], config: MesaConfig | None = None) -> None:
        super().__init__(blocks)
        self.compressor = Compressor(config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(x, *args, **kwargs)
        self.compressor.report.clear()
        with self.compressor.saving():
            return super().forward(x, *args, **kwargs)


def stack(blocks: Sequence[nn.Module], memory: str = "standard", **options: Any) -> nn.Module:
    """Wrap ``blocks`` in the memory mode ``memory``.

    The result is called as ``stack(x, *args, **kwargs)``; every block gets ``block(x, *args, **kwargs)``
    in every mode, and tensor arguments (positional or keyword) get their gradients.

    - ``"standard"``: plain autograd, every activation stored.
    - ``"checkpoint"``: each block's input stored, internals recomputed (torch.utils.checkpoint).
    - ``"mesa"``: every activation saved for backward kept as 8-bit codes; ``options`` are
      :class:`~revbits.mesa.MesaConfig` fields.
    - ``"bdia"``: :class:`~revbits.BDIAStack`, 1 bit per element per block; ``options`` go to it.
    - ``"bdia+mesa"``: BDIA, with the activations of each block recomputed in backward kept as
      8-bit codes; ``options`` go to BDIAStack or MesaConfig by name.
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"unknown memory mode {memory!r}; choose one of {', '.join(MEMORY_MODES)}")
    mesa_options = {k: v for k, v in options.items() if k in MesaConfig.option_names()}
    other_options = {k: v for k, v in options.items() if k not in mesa_options}
    if memory == "bdia":
        return BDIAStack(blocks, **options)
    if memory == "bdia+mesa":
        return BDIAStack(blocks, recompute_compressor=Compressor(MesaConfig(**mesa_options)), **other_options)
    if memory == "mesa" and not other_options:
        return MesaStack(blocks, MesaConfig(**mesa_options))
    if options:
        raise TypeError(f"option(s) {', '.join(sorted(options))} do not apply to memory={memory!r}")
    return CheckpointStack(blocks) if memory == "checkpoint" else SequentialStack(blocks)
