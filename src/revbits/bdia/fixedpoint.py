"""Fixed-point grid for the residual stream.

Every state of a reversible stack lives on the grid ``2**-bits * Z``. On that grid sums,
differences and multiplications by powers of two are exact in floating point as long as the
values stay inside the range where the format still resolves one grid step, so an inverse
that only uses those operations rebuilds its input bit for bit.
"""

from __future__ import annotations

import torch

#: How to run the blocks in low precision with a float32 stream (torch.autocast, FSDP2's MixedPrecisionPolicy).
LOW_PRECISION_ADVICE = (
    "keep the stream in float32 and let the blocks compute in low precision: under torch.autocast, or under "
    "FSDP2 with MixedPrecisionPolicy(param_dtype=torch.bfloat16, output_dtype=torch.float32) on each block "
    "(or cast_forward_inputs=False with the blocks under torch.autocast), and a float32 input to the stack "
    "(a MixedPrecisionPolicy with a low-precision param_dtype on the module that computes it, such as the "
    "root's, makes it low precision: cast it with .float())"
)

#: Number of significand bits (including the implicit one) of each supported stream dtype.
SIGNIFICAND_BITS = {torch.float32: 24, torch.float64: 53}


class _RoundToGrid(torch.autograd.Function):
    """Q(y) = round(y * 2**bits) / 2**bits with the straight-through gradient dQ/dy = 1."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        return _round_to_grid(y, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def _round_to_grid(y: torch.Tensor, bits: int) -> torch.Tensor:
    scale = float(2**bits)
    return (y * scale).round_().div_(scale)


def quantize(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``y`` to the grid ``2**-bits * Z`` (halves to even), straight-through in backward.

    Q(y) = round(y * 2**bits) * 2**-bits.  Multiplying and dividing by a power of two is exact,
    so the only rounding is the one to the nearest grid point. Where nothing is recorded for autograd (no grad,
    or y needs none) the same arithmetic runs without the autograd Function's per-call cost.
    """
    if not (torch.is_grad_enabled() and y.requires_grad) and not torch.compiler.is_compiling():
        return _round_to_grid(y, bits)
    return _RoundToGrid.apply(y, bits)


def exact_limit(dtype: torch.dtype, bits: int) -> float:
    """The bound L = 2**(p - bits) below which every grid value is exactly representable.

    ``p`` is the significand width of ``dtype`` (24 for float32, 53 for float64). Grid values
    with |x| < L, and sums and differences of them that also stay below L, are exact.
    """
    if dtype not in SIGNIFICAND_BITS:
        raise TypeError(f"the residual stream must be float32 or float64, got {dtype}; {LOW_PRECISION_ADVICE}")
    return float(2 ** (SIGNIFICAND_BITS[dtype] - bits))


def grid_codes(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes m = x * 2**bits of a tensor that lies on the grid (exact)."""
    code_dtype = torch.int64 if x.dtype == torch.float64 else torch.int32
    return (x * float(2**bits)).to(code_dtype)
