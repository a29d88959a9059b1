"""The checks of a BDIA backward: every rebuilt state against the forward's, exactly (``check=True``) or
by a 16-byte checksum, with one host sync for the whole backward and an error that names the block."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ReversibilityError
from .fixedpoint import quantize
from .step import state_checksum

__all__ = ["ReversibilityError", "compare_block0", "compare_state", "raise_on_mismatch"]


def compare_state(state: Any, index: int, rebuilt: torch.Tensor, mismatches: list[torch.Tensor]) -> None:
    """Check the rebuilt x_index against the forward: exactly (check=True) or by checksum."""
    if state.config.check:
        expected = state.states[index]
        if not torch.equal(rebuilt, expected):
            wrong = (rebuilt != expected).sum().item()
            worst = (rebuilt - expected).abs().max().item()
            raise ReversibilityError(
                f"block {index + 1} rebuilt x_{index} with {wrong} wrong elements "
                f"(max error {worst:.3g}): its recomputation was not bit-identical to the forward"
            )
    elif state.config.verify:
        mismatches.append(torch.any(state_checksum(rebuilt) != state.checksums[index]))


def compare_block0(state: Any, y0: torch.Tensor, rebuilt: torch.Tensor, mismatches: list[torch.Tensor]) -> None:
    """x_1 = Q(y_0) recomputed from x_0 must equal the x_1 that block 2's inverse rebuilt (``rebuilt``)."""
    config = state.config
    if config.check and not torch.equal(quantize(y0, config.bits), rebuilt):
        raise ReversibilityError("block 0 recomputed x_1 differently from the forward pass")
    if config.verify and not config.check:
        mismatches.append(_rounds_elsewhere(y0, rebuilt, config.bits))


def _rounds_elsewhere(y: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Whether Q(y) != x anywhere for a grid tensor x, as a 0-d bool tensor without a host sync, compared in grid
    codes: d = round(y 2**l) - 2**l x, which is Q(y) - x scaled by 2**l exactly, and Q(y) != x where d != 0 (+0
    and -0 count as equal, as for ``!=``; a NaN or Inf makes d NaN or Inf, a difference). Four passes over y and x
    and no bool temporary: several times faster on CPU than ``(quantize(y) != x).any()``."""
    if y.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=y.device)
    scale = float(2**bits)
    low, high = torch.aminmax((y * scale).round_().sub_(x, alpha=scale))
    return (low != 0) | (high != 0)


def raise_on_mismatch(state: Any, mismatches: list[torch.Tensor]) -> None:
    if not mismatches:
        return
    flags = torch.stack(mismatches).tolist()  # one host sync for the whole backward
    if not any(flags):
        return
    # mismatches were appended from block K-1 down to block 0; report the first one met
    block = len(state.config.blocks) - 1 - flags.index(True)
    raise ReversibilityError(
        f"the backward pass rebuilt a state that differs from the forward pass at block {block} "
        f"({type(state.config.blocks[block]).__name__}): the block's recomputation was not bit-identical. "
        "Typical causes: a non-deterministic kernel (call torch.use_deterministic_algorithms(True)), "
        "a block whose state changed between forward and backward (BatchNorm statistics, a "
        "parameter modified in place), randomness not drawn from torch's RNG, or a function compiled "
        "with torch.compile inside the block (compile the whole block instead, which the stack runs "
        "the same way in both passes). Construct the "
        "stack with check=True to compare every state exactly."
    )
