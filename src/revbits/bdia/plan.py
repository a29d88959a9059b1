"""What the reversible Function of :class:`~revbits.BDIAStack` works from: the stack's configuration, fixed
while its options are, and the state one forward pass saves for its backward.

- :class:`StackConfig` (frozen): the blocks, the step (grid 2**-l, |g| = 2**-b), the checks, the RNG
  replay, the recompute context. The stack builds it once and again only when an option changes.
- :class:`ForwardState`: one forward's block arguments, parameter tables, signs of g, batch chunks and
  autocast settings, and what it saves for the backward: the residue planes r_{k-1} (b bits per element
  per block and chunk), the RNG states, the checksums (or states, ``check=True``), the last two states
  x_{K-1}, x_K, and with ``keep_last_graph`` the top block's graph (:mod:`revbits.bdia.top_graph`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .args import BlockArguments
from .bits import PackedBits, unpack_rows
from .chunks import BatchSplit
from .step import Step
from .tools import RECOMPUTE, profiled

__all__ = ["ForwardState", "RecomputeContext", "StackConfig"]

#: ``context(k)`` -> the context manager the backward enters around each recomputation of block k.
RecomputeContext = Callable[[int], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class StackConfig:
    """The options of a stack that hold for every forward until one of them changes."""

    blocks: tuple[nn.Module, ...]
    step: Step  # one BDIA step k >= 1 and its inverse (bdia.step)
    check: bool  # keep every state and compare each rebuilt one exactly
    verify: bool  # compare a checksum of every rebuilt state
    preserve_rng: bool  # replay each block's RNG in the backward
    token_slice: int | str | None  # the token slices of token-wise modules (bdia.token_slices)
    recompute_context: RecomputeContext | None = None  # entered around each recomputation of a block
    backward_ends: Callable[[], None] | None = None  # called once the backward has rebuilt every state
    keep_last_graph: bool | str = False  # the option: True, False or "auto" (bdia.top_graph)

    @property
    def bits(self) -> int:
        return self.step.bits

    @contextlib.contextmanager
    def recomputing(self, k: int) -> Iterator[None]:
        """The stack's ``recompute_context(k)`` (or no context), in the profiler region ``revbits.bdia.recompute``."""
        context = contextlib.nullcontext() if self.recompute_context is None else self.recompute_context(k)
        with profiled(RECOMPUTE), context:
            yield


@dataclass
class ForwardState:
    """One forward pass: what it ran with, and what it saved for its backward."""

    config: StackConfig
    args: BlockArguments  # the extra block arguments, tensors replaced by None
    tensor_slots: list[int]  # where the tensor arguments go in args.values()
    param_index: list[list[int]]  # per block, indices of its tensors in the Function's parameter inputs
    block_params: list[list[torch.Tensor]]  # per block, its parameters and held tensors now (bdia.params)
    compiled: list[bool]  # per block, whether it holds compiled code (bdia.compile)
    params: list[torch.Tensor]  # the blocks' tensors of block_params, each once: the Function's parameter inputs
    signs: PackedBits  # the [K-1, B] signs of g, one bit each
    split: BatchSplit  # the batch chunks every block runs on (bdia.chunks)
    autocast: tuple[str, bool, torch.dtype]  # device type, enabled, dtype of the forward's autocast
    keep_last_graph: bool = False  # whether this forward keeps the top block's graph (bdia.top_graph)
    drawn_signs: torch.Tensor | None = None  # the [K-1, B] signs (+-1) while the forward runs; then None
    # Saved by the forward for the backward:
    residue_planes: list[list[PackedBits] | None] = field(default_factory=list)  # block k >= 1: per chunk r_{k-1}
    rng_states: list[tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=list)  # per block
    checksums: list[torch.Tensor] = field(default_factory=list)  # per state x_k, k < K (verify=True)
    states: list[torch.Tensor] = field(default_factory=list)  # every state x_k, k < K (check=True only)
    last_states: list[torch.Tensor] = field(default_factory=list)  # x_{K-1}, x_K
    output_version: int = 0  # x_K's version counter after the forward
    kept: list[Any] = field(default_factory=list)  # per chunk, the top block's KeptGraph (keep_last_graph)

    @property
    def num_params(self) -> int:
        return len(self.params)

    def block_args(self, tensors: Sequence[torch.Tensor]) -> BlockArguments:
        """The block arguments with ``tensors`` in the tensor slots."""
        values = self.args.values()
        for slot, tensor in zip(self.tensor_slots, tensors):
            values[slot] = tensor
        return self.args.with_values(values)

    def gamma_of(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """g_k = sign_k * |g| as a per-sample tensor broadcastable against the states (k >= 1): from the drawn
        signs during the forward, else unpacking row k - 1 of the stored bits only. Both give +-|g| exactly."""
        shape = (-1, *([1] * (like.dim() - 1)))
        gamma = self.config.step.gamma
        if self.drawn_signs is not None:
            return self.drawn_signs[k - 1].to(like.dtype).mul_(gamma).view(shape)
        bit = unpack_rows(self.signs, k - 1, 1, like.dtype).view(shape)  # a new tensor
        return bit.mul_(2 * gamma).sub_(gamma)  # 2 |g| - |g| and 0 - |g|
