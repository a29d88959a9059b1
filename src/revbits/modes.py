"""One switch for every model: run a list of residual blocks under a memory mode (``revbits.stack``).

``stack(blocks, memory=...)`` returns a module whose state dict is ``blocks.<i>.*`` in every
mode, so weights trained in one mode load into any other.
"""

from __future__ import annotations

import contextlib
import inspect
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


class BDIAMesaStack(BDIAStack):
    """BDIA (:class:`~revbits.BDIAStack`) with the graph of each block recomputed in backward saving its
    activations as 8-bit codes (:mod:`revbits.mesa`), through the stack's generic ``recompute_context``.

    The forward, the rebuilt states and their checks are those of BDIA, bit for bit; only the gradients of
    the block internals see the rounding. ``stack.compressor.report`` describes the last training step's
    recomputation; a NaN or inf in a recomputed activation raises at the end of the stack's backward.
    """

    def __init__(self, blocks: Sequence[nn.Module], config: MesaConfig | None = None, **options: Any) -> None:
        super().__init__(blocks, recompute_context=self._saving_in_8_bits, **options)
        self.compressor = Compressor(config)

    def _saving_in_8_bits(self, k: int) -> contextlib.AbstractContextManager:
        """Block k's recomputation saves through the compressor, its running ranges keyed by block."""
        return self.compressor.saving(namespace=f"block{k}", check=False)

    def _reversible_step_starts(self) -> None:
        self.compressor.report.clear()  # it will describe this step's recomputation

    def _reversible_backward_ends(self) -> None:
        self.compressor.raise_if_nonfinite()  # one host sync for the whole backward


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
    misplaced = sorted(set(options) - option_names(memory))
    if misplaced:
        raise TypeError(f"option(s) {', '.join(misplaced)} do not apply to memory={memory!r}")
    mesa_options = {k: v for k, v in options.items() if k in MesaConfig.option_names()}
    bdia_options = {k: v for k, v in options.items() if k not in mesa_options}
    if memory == "bdia":
        return BDIAStack(blocks, **bdia_options)
    if memory == "bdia+mesa":
        return BDIAMesaStack(blocks, MesaConfig(**mesa_options), **bdia_options)
    if memory == "mesa":
        return MesaStack(blocks, MesaConfig(**mesa_options))
    return CheckpointStack(blocks) if memory == "checkpoint" else SequentialStack(blocks)


def option_names(memory: str) -> frozenset[str]:
    """The options :func:`stack` takes for ``memory``: MesaConfig's fields for the Mesa modes, BDIAStack's
    keyword arguments for the BDIA modes (bdia+mesa sets the recompute context itself), none otherwise."""
    mesa = MesaConfig.option_names()
    bdia = frozenset(inspect.signature(BDIAStack.__init__).parameters) - {"self", "blocks"}
    return {
        "standard": frozenset(),
        "checkpoint": frozenset(),
        "mesa": mesa,
        "bdia": bdia,
        "bdia+mesa": mesa | (bdia - {"recompute_context"}),
    }[memory]
