"""8-bit affine codes with one fp32 (low, step) pair per group, and stochastic rounding.

For a group g with range [low_g, high_g] and step_g = max(high_g - low_g, eps) / 255:

    code = clamp(floor((x - low_g) / step_g + u), 0, 255),   u ~ U[0, 1)
    x_hat = low_g + step_g * code

E[x_hat] = x for x inside the range (unbiased rounding), and values outside the range saturate
at the nearest end; a code never wraps around.

On CPU every pass runs over slices of about a megabyte along the first axis, so that the passes
of one slice (range, scale, dither, clamp, convert) hit the cache and the fp32 temporaries stay
small; on GPU the whole tensor is one slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

CODE_MAX = 255
# the smallest step: a constant group dequantises to its value without dividing by zero
MIN_STEP = 1e-30
CPU_SLICE_ELEMENTS = 1 << 18


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


def _slices(x: torch.Tensor) -> Iterator[slice]:
    """Consecutive slices of the first axis, about CPU_SLICE_ELEMENTS each (one on GPU)."""
    rows = x.shape[0] if x.dim() else 1
    if x.dim() == 0 or x.device.type != "cpu":
        yield slice(0, rows)
        return
    per_row = max(1, x[0].numel())
    step = max(1, CPU_SLICE_ELEMENTS // per_row)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _part(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """The rows of a broadcastable per-group tensor that match rows of the data."""
    return t[rows] if t.dim() and t.shape[0] != 1 else t


def group_range(x: torch.Tensor, layout: GroupLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per group in fp32, shaped to broadcast against ``x`` (per index of the axis)."""
    if layout.axis is None:
        low, high = x.amin().float(), x.amax().float()
        return low.reshape([1] * x.dim()), high.reshape([1] * x.dim())
    axis = layout.axis
    others = tuple(d for d in range(x.dim()) if d != axis)
    lows, highs = [], []
    for rows in _slices(x):
        part = x[rows]
        lows.append(part.amin(dim=others, keepdim=True))
        highs.append(part.amax(dim=others, keepdim=True))
    if axis == 0:  # the slices cut the group axis: their ranges are side by side
        low, high = torch.cat(lows), torch.cat(highs)
    else:
        low, high = lows[0], highs[0]
        for a, b in zip(lows[1:], highs[1:]):
            low, high = torch.minimum(low, a), torch.maximum(high, b)
    low, high = low.float(), high.float()
    if layout.size > 1:
        shape = low.shape
        low = _pool_groups(low.flatten(), layout.size, torch.amin).view(shape)
        high = _pool_groups(high.flatten(), layout.size, torch.amax).view(shape)
    return low, high


def _pool_groups(per_index: torch.Tensor, size: int, reduce) -> torch.Tensor:
    """Reduce runs of ``size`` consecutive entries and repeat each result over its run."""
    n = per_index.numel()
    groups = -(-n // size)
    padded = per_index.new_empty(groups * size)
    padded[:n] = per_index
    padded[n:] = per_index[-1]  # the last group may be short; repeating a member changes nothing
    pooled = reduce(padded.view(groups, size), dim=1)
    return pooled.repeat_interleave(size)[:n]


def random_bytes(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform random bytes, drawn as 64-bit words (8 bytes per draw of the generator)."""
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, (-(-n // 8),), dtype=torch.int64, device=device, generator=generator)
    return words.view(torch.uint8)[:n].view(shape)


def quantize_codes(
    x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, the shape of x) and the fp32 step per group: Mesa's 8-bit quantiser (not the BDIA grid
    Q of :func:`revbits.bdia.fixedpoint.quantize`).

    The dither u is (k + 1/2) / 256 with k a uniform random byte from ``generator``: unbiased to
    1/512 of a step, at a quarter of the memory of fp32 noise. ``generator=None`` rounds to
    nearest (u = 1/2). The scaled value is x / step + (u - low / step), one fused multiply-add;
    its rounding error stays well below a code unless |low| exceeds the group's range by
    about 10**5.
    """
    step = (high - low).clamp_min_(MIN_STEP).div_(CODE_MAX)
    inverse = step.reciprocal()
    bias = (low * inverse).neg_().add_(0.5 if generator is None else 0.5 / 256)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for rows in _slices(x):
        part = x[rows]
        scaled = torch.addcmul(_part(bias, rows), part, _part(inverse, rows))
        if generator is not None:
            scaled.add_(random_bytes(part.shape, generator, x.device), alpha=1 / 256)
        codes[rows] = scaled.clamp_(0, CODE_MAX)  # the conversion truncates, which is the floor here
    return codes, step




def dequantize(codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x_hat = low + step * code, in ``dtype``."""
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for rows in _slices(codes):
        torch.addcmul(_part(low, rows), codes[rows], _part(step, rows), out=out[rows])
    return out
