"""One BDIA step and its exact inverse, shared by BDIAStack (reversible and plain paths) and PETRA.

For block k >= 1 with output y_k = block_k(x_k), a per-sample g_k = +-2**-b and the grid 2**-l,
:class:`Step` computes

    forward   x_{k+1} = g_k (x_{k-1} + r_{k-1} 2**-l) + Q((1 + g_k) y_k - 2 g_k x_k)
    inverse   x_{k-1} = (x_{k+1} - Q((1 + g_k) y_k - 2 g_k x_k)) / g_k - r_{k-1} 2**-l

with the residue r_{k-1} = (-x_{k-1} 2**l) mod 2**b, of which the forward keeps b bits per element.
Every function here returns values on the grid 2**-l, and every operation on grid values below the
exact limit is exact, so evaluation order and in-place updates cannot change a bit. The one rounding
that is not exact, inside :func:`combine`, is one sequence of operations used by every path (in a custom
Function where autograd records it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import native_step
from .args import BlockArguments
from .bits import PackedBits, pack_bits, unpack_bits
from .fixedpoint import LOW_PRECISION_ADVICE, exact_limit
from .tools import INVERSE, profiled


class BlockProtocolError(ValueError):
    """A block broke the protocol ``block(x, *args) -> y`` with y of the shape and dtype of x."""


class StreamRangeError(ValueError):
    """A residual state left the range where the fixed-point grid is exact, or is not finite."""


def gamma_exponent(gamma: float) -> int:
    """The b with |gamma| = 2**-b, for b in 1..8; anything else cannot be inverted exactly."""
    magnitude = abs(float(gamma))
    if magnitude > 0:
        b = -math.log2(magnitude)
        if b == round(b) and 1 <= round(b) <= 8:
            return int(round(b))
    raise ValueError(
        f"gamma must be 2**-b with b an integer from 1 to 8 (0.5, 0.25, ...), got {gamma}: "
        "only a power of two can be divided out exactly, and b bits per element are stored"
    )


class _Combine(torch.autograd.Function):
    """u = Q((1 + g) y - 2 g x) with a straight-through Q.

    Computed as round(y (1 + g) 2**l - 2 2**l g x) 2**-l: the product with y and the sum each
    round once, the rest is exact. Exactness of the inverse only needs every pass (forward,
    reference, recomputation) to use this one function, which they do. The result is always
    contiguous, so every state of the stack has one memory layout. Gradients: du/dy = 1 + g,
    du/dx = -2 g.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(g)
        return _combine_values(x, y, g, bits)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (g,) = ctx.saved_tensors
        return grad * (-2 * g), grad * (1 + g), None, None


def _combine_values(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    scale = float(2**bits)
    u = (y * ((1 + g) * scale)).contiguous()
    u.addcmul_(x, g, value=-2 * scale)
    return u.round_().mul_(1.0 / scale)  # the product with 2**-l equals the division by 2**l, bit for bit


def combine(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """u = Q((1 + g) * y - 2 g * x), the quantised block term of the BDIA update. Where nothing is recorded for
    autograd the same arithmetic runs without the autograd Function's per-call cost."""
    recording = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad or g.requires_grad)
    if not recording and not torch.compiler.is_compiling():
        return _combine_values(x, y, g, bits)
    return _Combine.apply(x, y, g, bits)


def residue(x_prev: torch.Tensor, bits: int, gamma_bits: int) -> torch.Tensor:
    """r = (-m) mod 2**b for the grid code m = x_prev 2**l: the bits that g * x_prev would lose.

    Computed as r = a - floor(a 2**-b) 2**b with a = -m, in x_prev's dtype: every step (scaling by powers
    of two, floor, the difference of two integers below 2**p) is exact, and it avoids the division inside
    ``remainder``, several times slower on CPU than these passes. A zero r may come out as -0.0 or +0.0; no result
    depends on which, since r is used as an integer or added to x_prev (see :func:`forward_step`).
    """
    a = x_prev * -(2.0**bits)
    return a.sub_(torch.mul(a, 2.0**-gamma_bits).floor_(), alpha=2.0**gamma_bits)


def residue_bytes(r: torch.Tensor, gamma_bits: int) -> torch.Tensor:
    """The residue r of :func:`residue` (integers 0 .. 2**b - 1 in a float tensor) as uint8. For b <= 7 they fit
    int8, whose conversion from float is vectorised (several times faster than uint8's on CPU) and whose bytes are
    uint8's for these values."""
    return r.to(torch.int8).view(torch.uint8) if gamma_bits <= 7 else r.to(torch.uint8)


def forward_step(x_prev: torch.Tensor, r: torch.Tensor, u: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """x_{k+1} = g * (x_{k-1} + r * 2**-l) + u, exact on the grid (differentiable).

    s = x_{k-1} + r 2**-l is x_{k-1} rounded up to a multiple of 2**(b - l), so it is 0 exactly when
    x_{k-1} is; then it is +0.0 whatever the signs of the zeros in x_{k-1} and r (IEEE: +0 + -0 = +0,
    and a nonzero x_{k-1} whose s is 0 gives x + (-x) = +0), so every bit of the result is fixed.
    """
    return u + g * (x_prev + r * 2.0**-bits)


def forward_step_(x_prev: torch.Tensor, r: torch.Tensor, u: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`forward_step` computed in the buffers of ``r`` and ``u`` (no autograd), bit-identical: r 2**-l
    is exact, so x_{k-1} + 2**-l r rounds once whether it is fused or not."""
    return u.addcmul_(torch.add(x_prev, r, alpha=2.0**-bits, out=r), g)


def inverse_step_(x_next: torch.Tensor, r: torch.Tensor, u: torch.Tensor, g: torch.Tensor, bits: int) -> torch.Tensor:
    """x_{k-1} = (x_{k+1} - u) / g - r * 2**-l, the exact inverse, computed in ``u``'s buffer.

    The division by -g = -+2**-b is the product with -1/g = -+2**b, bit for bit (signed zeros included).
    """
    return u.sub_(x_next).mul_(g.reciprocal().neg_()).sub_(r, alpha=2.0**-bits)


class Step:
    """One BDIA step k >= 1 on the grid 2**-``bits`` with |g| = ``gamma`` = 2**-b, and its exact inverse
    (the equations of the module docstring). The signs of g and the block call belong to the caller."""

    def __init__(self, bits: int, gamma: float) -> None:
        self.bits, self.gamma, self.gamma_bits = bits, float(gamma), gamma_exponent(gamma)

    def forward(
        self,
        x_prev: torch.Tensor,
        x_cur: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        keep: bool = True,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PackedBits | None]:
        """x_{k+1} from x_{k-1}, x_k and y_k = block_k(x_k), and (with ``keep``) the packed residue bits of
        x_{k-1} that :meth:`inverse` needs. Differentiable with grad enabled (r is a constant, so the skip
        path's gradient is g); without grad it works in its own temporaries, or in one native pass
        (:mod:`revbits.bdia.native_step`). All give the same bits. x_{k+1} may be written in ``out`` (which
        may be x_{k-1}); callers copy it there where the returned tensor is not ``out``."""
        fused = native_step.forward_step(x_prev, x_cur, y, g, self.bits, self.gamma_bits, keep, out)
        if fused is not None:
            x_next, planes = fused
            return x_next, (None if planes is None else PackedBits(planes, x_prev.shape, self.gamma_bits))
        r = residue(x_prev.detach(), self.bits, self.gamma_bits)
        kept = pack_bits(residue_bytes(r, self.gamma_bits), self.gamma_bits) if keep else None
        u = combine(x_cur, y, g, self.bits)
        if torch.is_grad_enabled():
            return forward_step(x_prev, r, u, g, self.bits), kept
        return forward_step_(x_prev, r, u, g, self.bits), kept

    @torch.no_grad()
    def inverse(
        self,
        x_next: torch.Tensor,
        x_cur: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        kept: PackedBits,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{k-1}, exactly, from x_{k+1}, x_k, the recomputed y_k and the residue bits :meth:`forward` kept.
        It is the forward's x_{k-1} bit for bit if y_k is bit for bit the forward's. As :meth:`forward`, it may
        be written in ``out`` (which may be x_{k+1})."""
        with profiled(INVERSE):
            if kept.shape == x_next.shape and kept.width == self.gamma_bits:
                fused = native_step.inverse_step(x_next, x_cur, y, g, kept.data, self.bits, out)  # no grad here
                if fused is not None:
                    return fused
            u = combine(x_cur, y.detach(), g, self.bits)
            return inverse_step_(x_next, unpack_bits(kept, x_cur.dtype), u, g, self.bits)


def call_block(block: nn.Module, index: int, x: torch.Tensor, args: Sequence[Any] | BlockArguments) -> torch.Tensor:
    """y = block(x, *args) (or block(x, *args, **kwargs) for a BlockArguments), checked against the block protocol."""
    # While dynamo traces (the plain and evaluation paths under torch.compile), a version counter is a
    # data-dependent value that breaks the graph at every block; the reversible path runs eagerly and checks.
    # Inference tensors (inference_mode) keep no version.
    checked = not torch.compiler.is_compiling() and not x.is_inference()
    version = x._version if checked else 0
    y = args.call(block, x) if isinstance(args, BlockArguments) else block(x, *args)
    if checked and x._version != version:
        raise BlockProtocolError(
            f"block {index} ({type(block).__name__}) modified its input in place; a reversible stack keeps "
            "the states it is given, so write `x = x + f(x)` instead of `x += f(x)`"
        )
    if not isinstance(y, torch.Tensor):
        raise BlockProtocolError(
            f"block {index} ({type(block).__name__}) returned {type(y).__name__}, not a tensor; "
            "a block must return one tensor of the shape and dtype of its input"
        )
    if y.shape != x.shape or y.dtype != x.dtype:
        advice = "add the residual in the input dtype under autocast"
        if y.shape == x.shape and "FSDPModule" in {c.__name__ for c in type(block).__mro__}:
            advice = "FSDP2's MixedPrecisionPolicy casts the block's input and parameters: " + LOW_PRECISION_ADVICE
        raise BlockProtocolError(
            f"block {index} ({type(block).__name__}) maps {tuple(x.shape)} {x.dtype} to "
            f"{tuple(y.shape)} {y.dtype}; a reversible stack needs blocks that keep the shape "
            f"and dtype of the residual stream ({advice})"
        )
    return y


def stream_extremes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min x, max x) as 0-d tensors of x's dtype (NaN if x holds a NaN, 0 if x is empty, as a batch of 0 samples
    is), in one pass, without a host sync or a copy; :func:`raise_if_out_of_range` takes max |x| from them."""
    if x.numel() == 0:
        zero = x.new_zeros(())
        return zero, zero
    low, high = torch.aminmax(x.detach() if x.requires_grad else x)
    return low, high


def raise_if_out_of_range(
    extremes: Sequence[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, bits: int
) -> None:
    """Raise StreamRangeError naming the first state x_i with |x_i| >= 2**(p - bits) or NaN/Inf.

    ``extremes[i]`` is :func:`stream_extremes` of x_i, and max |x_i| = max(|min x_i|, |max x_i|) (NaN stays NaN).
    One host synchronisation covers all states.
    """
    limit = exact_limit(dtype, bits)
    lows_then_highs = torch.stack([low for low, _ in extremes] + [high for _, high in extremes])
    for index, value in enumerate(lows_then_highs.abs_().view(2, -1).amax(dim=0).tolist()):
        if value < limit:
            continue
        source = "the input of the stack" if index == 0 else f"the output of block {index - 1}"
        if not math.isfinite(value):
            raise StreamRangeError(f"{source} (state x_{index}) contains NaN or Inf")
        wider = ", or use float64" if dtype != torch.float64 else ""
        raise StreamRangeError(
            f"{source} (state x_{index}) reaches |x| = {value:.6g}, at or beyond "
            f"2**{int(math.log2(limit))} = {limit:g}, where a 2**-{bits} grid stops being exact "
            f"in {dtype}; normalise the stream or lower `bits`{wider}"
        )


def state_checksum(x: torch.Tensor) -> torch.Tensor:
    """(||x||_2 accumulated in float64, sum x): equal states give equal values, a changed one not.

    For grid values the float64 sum of squares is exact, so any change of one element changes
    it; the square also catches changes that cancel in a plain sum (+d here, -d there). Both
    reductions read x in place without a temporary.
    """
    return torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64), x.sum().to(torch.float64)])


def check_block_arguments(args: BlockArguments) -> None:
    """Tensors that need gradients must be top-level block arguments (positional or keyword): only those
    become inputs of the reversible Function, so a nested one would silently get no gradient."""
    for name, arg in zip(args.names(), args.values()):
        if isinstance(arg, torch.Tensor):
            continue
        nested = [t for t in tree_flatten(arg)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if nested:
            raise BlockProtocolError(
                f"block {name} is a {type(arg).__name__} holding a tensor that requires grad; pass such "
                "tensors as separate top-level arguments so that their gradients can be returned"
            )
