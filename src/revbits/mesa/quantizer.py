"""8-bit affine codes with one fp32 (low, step) pair per group, and stochastic rounding.

For a group g with range [low_g, high_g] and step_g = max(high_g - low_g, eps) / 255:

    code = clamp(floor((x - low_g) / step_g + u), 0, 255),   u ~ U[0, 1)

    x_hat = low_g + step_g * code

E[x_hat] = x for x inside the range (unbiased rounding), and values outside the range saturate
at the nearest end; a code never wraps around.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CODE_MAX = 255
# the smallest step: a constant group dequantises to its value without dividing by zero
MIN_STEP = 1e-30


@dataclass(frozen=True)
class GroupLayout:
    """Which axis carries the groups, and how many consecutive indices share one range.

    ``axis=None`` means one group for the whole tensor.
    """

    axis: int | None
    size: int = 1


def layout_for(shape: torch.Size, attention: bool, channel_group: int) -> GroupLayout:
    """Per head for attention tensors, per channel group elsewhere.

    - attention tensors of 3 or more dims, (B, H, T, D) or (B*H, T, S): one group per index of
      axis ndim - 3, i.e. per head (per batch-and-head for the folded form);
    - other 4-D tensors (B, C, H, W) or (B, H, T, D): one group per index of axis 1;
    - 2-D and 3-D tensors (..., C): groups of ``channel_group`` consecutive channels of the
      last axis;
    - scalars and vectors: one group.
    """
    ndim = len(shape)
    if ndim <= 1:
        return GroupLayout(None)
    if attention and ndim >= 3:
        return GroupLayout(ndim - 3)
    if ndim == 4:
        return GroupLayout(1)
    return GroupLayout(ndim - 1, channel_group)


def group_range(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per group in fp32, shaped to broadcast against ``x`` (per index of the axis)."""
    if layout.axis is None:
        low, high = x.amin().float(), x.amax().float()
        return low.reshape([1] * x.dim()), high.reshape([1] * x.dim())
    axis = layout.axis
    others = tuple(d for d in range(x.dim()) if d != axis)
    low, high = x.amin(dim=others).float(), x.amax(dim=others).float()
    if layout.size > 1:
        low, high = _pool_groups(low, layout.size, torch.amin), _pool_groups(high, layout.size, torch.amax)
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return low.reshape(shape), high.reshape(shape)


def _pool_groups(per_index: torch.Tensor, size: int, reduce) -> torch.Tensor:
    """Reduce runs of ``size`` consecutive entries and repeat each result over its run."""
    n = per_index.numel()
    groups = -(-n // size)
    padded = per_index.new_empty(groups * size)
    padded[:n] = per_index
    padded[n:] = per_index[-1]  # the last group may be short; repeating a member changes nothing
    pooled = reduce(padded.view(groups, size), dim=1)
    return pooled.repeat_interleave(size)[:n]


def quantize(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, the shape of x) and the fp32 step per group.

    The dither u is (k + 1/2) / 256 with k a uniform random byte from ``generator``: unbiased to
    1/512 of a step, at a quarter of the memory of fp32 noise. ``generator=None`` rounds to
    nearest (u = 1/2).
    """
    step = (high - low).clamp_min_(MIN_STEP).div_(CODE_MAX)
    scaled = torch.sub(x, low).mul_(step.reciprocal())  # fp32, as low is fp32
    if generator is None:
        scaled.add_(0.5)
    else:
        dither = torch.randint(0, 256, x.shape, dtype=torch.uint8, device=x.device, generator=generator)
        scaled.add_(dither, alpha=1 / 256).add_(0.5 / 256)
        del dither
    # truncating a value clamped to [0, 255] is its floor
    return scaled.clamp_(0, CODE_MAX).to(torch.uint8), step


def dequantize(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = low + step * code, in ``dtype``."""
    return (codes * step).add_(low).to(dtype)
