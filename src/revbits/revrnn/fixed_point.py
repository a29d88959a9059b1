"""The fixed-point arithmetic of the reversible RNN cells: states, gates, and one exact update.

States are integers holding round(v * 2**23). A forget-type gate z is bounded below by 1 - m
with m = 1 - 2**-k, z = m sigma(a) + 1 - m, and rounded to n / 2**10 with n >= 2**(10 - k):
multiplying by it loses at most k bits, which an InfoBuffer keeps. The additive part of an update
is rounded to the state grid, so

    h <- h * n / 2**10 (exact, through the buffer) + round(add * 2**23)

is undone by subtracting the same rounded additive part and dividing by n through the buffer.

For gradients an update is also the float expression h_new = z_q h + add with z_q = n / 2**10
(straight-through to z), whose value is replaced by the exact fixed-point result.
"""

from __future__ import annotations

import torch

from .info_buffer import InfoBuffer

STATE_BITS = 23  # fractional bits of h and c
GATE_BITS = 10  # gates are n / 2**10
STATE_LIMIT = 2**31  # |state integer| must stay below this (|value| < 256)
FORGET_BITS = (1, 2, 3, 5, None)

# v * 2**23 and h * 2**-23 are exact in these dtypes (a power-of-two scaling of a normal number),
# and int64 -> float rounds once, so no detour through float64 is needed for them.
_EXACT_SCALING = (torch.float32, torch.float64)


def to_fixed(v: torch.Tensor) -> torch.Tensor:
    """round(v * 2**23) as int64."""
    if v.dtype not in _EXACT_SCALING:
        v = v.double()
    return torch.round(v * 2**STATE_BITS).to(torch.int64)


_GRID: dict[tuple[torch.dtype, float], torch.Tensor] = {}  # scale * 2**-23 as a 0-d tensor per dtype and scale


def to_float(h: torch.Tensor, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    """h / 2**23, the value of a fixed-point state, rounded once to ``dtype`` (times ``scale``, in the
    same operator, for gradients: then rounded twice unless ``scale`` is a power of two)."""
    if dtype not in _EXACT_SCALING:
        return (h.double() * (scale * 2.0**-STATE_BITS)).to(dtype)
    grid = _GRID.get((dtype, scale))
    if grid is None:
        grid = _GRID[dtype, scale] = torch.tensor(scale * 2.0**-STATE_BITS, dtype=dtype)
    return h * grid  # one op: each element is converted to dtype (rounded once), then scaled exactly


_ZERO: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # a 0-d zero per dtype and device


def fixed_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """to_fixed(a * b) for |a|, |b| <= 1 (a gate times a gate or a tanh), in one operator fewer.

    In float32 and float64 addcmul(0, a, b, value=2**23) computes (2**23 a) b + 0: 2**23 a is exact,
    and (2**23 a) b is a b rounded once and scaled by 2**23, which is to_fixed's rounded a b scaled
    exactly; where a b is below the normal range both round to 0 (the scaled value is under 2**-100)."""
    if a.dtype not in _EXACT_SCALING:
        return to_fixed(a * b)
    key = (a.dtype, a.device)
    zero = _ZERO.get(key)
    if zero is None:
        zero = _ZERO[key] = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.round(torch.addcmul(zero, a, b, value=2**STATE_BITS)).to(torch.int64)


def fixed_complement_product(n: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """to_fixed((1 - n / 2**10) g) for a gate numerator n (integer values in g's dtype). In float32
    and float64, 2**23 - 2**13 n is exactly 2**23 (1 - n / 2**10), and the factor 2**23 commutes
    with rounding, so round((2**23 - 2**13 n) g) rounds the same product once, as to_fixed does."""
    if g.dtype not in _EXACT_SCALING:
        return to_fixed((1 - n * 2.0**-GATE_BITS) * g)
    complement = torch.rsub(n, 2**STATE_BITS, alpha=2 ** (STATE_BITS - GATE_BITS))
    return torch.round(complement * g).to(torch.int64)


def straight_through(value: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Exactly ``value``, with the gradient of ``graph``."""
    return value.detach() + (graph - graph.detach())


def lowest_numerator(forget_bits: int | None) -> int:
    return 1 if forget_bits is None else 2 ** (GATE_BITS - forget_bits)


class ForgetGate:
    """z = m sigma(a) + 1 - m with m = 1 - 2**-k, rounded to n / 2**10 with n >= 2**(10-k)."""

    def __init__(self, forget_bits: int | None) -> None:
        self.keep = 0.0 if forget_bits is None else 2.0**-forget_bits  # 1 - m
        self.lowest = lowest_numerator(forget_bits)

    def numerator(self, s: torch.Tensor) -> torch.Tensor:
        """n = round(z 2**10) clamped to [2**(10-k), 2**10] (integer values, s's dtype), from s = sigma(a).

        Scaling by 2**10 commutes with rounding, so round(((1 - keep) s + keep) 2**10) is
        round(s (1 - keep) 2**10 + keep 2**10) in any float dtype."""
        scaled = (s.detach() if s.requires_grad else s) * ((1 - self.keep) * 2**GATE_BITS)
        if self.keep:
            scaled = scaled + self.keep * 2**GATE_BITS
        return torch.round(scaled).clamp_(self.lowest, 2**GATE_BITS)

    def quantised(self, n: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """z_q = n / 2**10; under autograd with the gradient of z = (1 - keep) s + keep."""
        z_q = n * 2.0**-GATE_BITS
        if s.requires_grad:
            z_q = straight_through(z_q, (1 - self.keep) * s + self.keep)
        return z_q

    @property
    def slope(self) -> float:
        """dz / d sigma(a) = 1 - keep."""
        return 1.0 - self.keep

    def scaled_gradient(self, grad_z: torch.Tensor) -> torch.Tensor:
        """dL/d sigma(a) from dL/dz."""
        return grad_z * (1 - self.keep) if self.keep else grad_z


def _masked(update: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    return update if active is None else torch.where(active[:, None], update, 0)


def exact_update(
    buffer: InfoBuffer, h: torch.Tensor, n: torch.Tensor, add: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """h * n / 2**10 + add for the active rows, exactly (h, n and the fixed-point ``add`` int64)."""
    return buffer.multiply(h, n, active).add_(_masked(add, active))  # multiply returns a new tensor


def exact_reverse(
    buffer: InfoBuffer, h_new: torch.Tensor, n: torch.Tensor, add: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """The h that :func:`exact_update` was given."""
    return buffer.divide(h_new - _masked(add, active), n, active)


def state_float(
    new: torch.Tensor, h_float: torch.Tensor, graph: torch.Tensor | None, active: torch.Tensor | None
) -> torch.Tensor:
    """The float value of the updated state ``new`` (int64). With ``graph`` (the update's float
    expression, z_q h_float + add, under autograd) it carries graph's gradient, and rows that
    are not ``active`` keep h_float."""
    value = to_float(new, h_float.dtype)
    if graph is None:
        return value
    value = value + (graph - graph.detach())
    return value if active is None else torch.where(active[:, None], value, h_float)


def update_gradients(
    grad_new: torch.Tensor, z_q: torch.Tensor, active: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For h_new = z_q h + add (kept as h where the row is not active): (dL/dh, the gradient that
    reaches the update: dL/d add, and dL/dz_q / h)."""
    if active is None:
        return grad_new * z_q, grad_new
    row = active[:, None]
    return torch.where(row, grad_new * z_q, grad_new), torch.where(row, grad_new, 0)
