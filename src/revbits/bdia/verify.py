"""The checks of a BDIA backward: every rebuilt state against the forward's, exactly (``check=True``) or
by a 16-byte checksum, with one host sync for the whole backward and an error that names the block."""

from __future__ import annotations

from typing import Any

import torch

from .step import state_checksum

__all__ = ["ReversibilityError", "compare_block0", "compare_state", "differ", "raise_on_mismatch"]


class ReversibilityError(RuntimeError):
    """A state rebuilt in the backward pass differs from the one the forward pass produced."""


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


def compare_block0(
    state: Any, recomputed: torch.Tensor, rebuilt: torch.Tensor, mismatches: list[torch.Tensor]
) -> None:
    """x_1 recomputed from x_0 must equal the x_1 that block 2's inverse rebuilt."""
    if state.config.check and not torch.equal(recomputed, rebuilt):
        raise ReversibilityError("block 0 recomputed x_1 differently from the forward pass")
    if state.config.verify and not state.config.check:
        mismatches.append(differ(recomputed, rebuilt))


def differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Whether two grid tensors differ anywhere, as a 0-d bool tensor without a host sync: max |a - b| != 0.
    The difference of two finite floats is 0 only where they are equal (+0 and -0 count as equal, as for
    ``a != b``), and a NaN on either side makes it NaN, a difference. Three passes over a and b without a bool
    temporary: several times faster on CPU than ``(a != b).any()``."""
    if a.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=a.device)
    return torch.sub(a, b).abs_().amax() != 0


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
