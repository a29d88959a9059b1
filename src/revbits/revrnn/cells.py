"""RevGRU and RevLSTM cells: one time step in exact fixed point, forward and reverse.

The hidden state is split in halves h = [h1; h2] (and c = [c1; c2] for the LSTM). Half 1 is
updated from x and the old h2, then half 2 from x and the new h1 (MacKay et al. 2018):

    RevGRU half:  [z; r] = sigma(W [x; h_other]),  g = tanh(V [x; r * h_other])
                  h <- z * h + (1 - z) * g
    RevLSTM half: [f; g; i; o; p] = gates(U [x; h_other])  (g tanh, the rest sigma)
                  c <- f * c + i * g,   h <- p * h + o * tanh(c)

States are integers holding round(v * 2**23). A forget-type gate (z, f, p) is bounded below by
1 - m with m = 1 - 2**-k, z = m sigma(a) + 1 - m, and rounded to n / 2**10 with
n >= 2**(10 - k): multiplying by it loses at most k bits, which an InfoBuffer keeps. The
additive part is rounded to the state grid. Reversal recomputes the gates of a half from x and
the other half, subtracts the additive part and divides by n through the buffer.

For gradients each step is also expressed in floating point, h_new = z_q h + (1 - z_q) g with
z_q = n / 2**10 (straight-through), and its value replaced by the exact fixed-point result.
"""

from __future__ import annotations

import torch
from torch import nn

from .info_buffer import InfoBuffer

STATE_BITS = 23  # fractional bits of h and c
GATE_BITS = 10  # gates are n / 2**10
STATE_LIMIT = 2**31  # |state integer| must stay below this (|value| < 256)
FORGET_BITS = (1, 2, 3, 5, None)


def to_fixed(v: torch.Tensor) -> torch.Tensor:
    """round(v * 2**23) as int64."""
    return torch.round(v.double() * 2**STATE_BITS).to(torch.int64)


def to_float(h: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """h / 2**23, the value of a fixed-point state."""
    return (h.double() / 2**STATE_BITS).to(dtype)


def straight_through(value: torch.Tensor, graph: torch.Tensor) -> torch.Tensor:
    """Exactly ``value``, with the gradient of ``graph``."""
    return value.detach() + (graph - graph.detach())


def lowest_numerator(forget_bits: int | None) -> int:
    return 1 if forget_bits is None else 2 ** (GATE_BITS - forget_bits)


class ForgetGate:
    """z = m sigma(a) + 1 - m with m = 1 - 2**-k, and its numerator n = round(z 2**10) >= 2**(10-k)."""

    def __init__(self, forget_bits: int | None) -> None:
        self.keep = 0.0 if forget_bits is None else 2.0**-forget_bits  # 1 - m
        self.lowest = lowest_numerator(forget_bits)

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_q, n): the gate with a straight-through rounding to n / 2**10, and n (int64)."""
        z = (1 - self.keep) * torch.sigmoid(logits) + self.keep
        n = torch.round(z.detach().double() * 2**GATE_BITS).to(torch.int64).clamp_(self.lowest, 2**GATE_BITS)
        return straight_through(n.to(z.dtype) / 2**GATE_BITS, z), n


class Replay:
    """Stands in for the InfoBuffer when a step is re-run for its gradients: each update
    returns the exact result already known from the reversal, in update order."""

    def __init__(self, results: list[torch.Tensor]) -> None:
        self.results = list(results)

    def next(self) -> torch.Tensor:
        return self.results.pop(0)


def exact_update(
    buffer: InfoBuffer | Replay,
    h: torch.Tensor,
    h_float: torch.Tensor,
    z_q: torch.Tensor,
    n: torch.Tensor,
    add: torch.Tensor,
    active: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h <- z h + add: the exact integer result and the float expression carrying its gradient."""
    if isinstance(buffer, Replay):
        new_fixed = buffer.next()
    else:
        new_fixed = buffer.multiply(h, n, active) + _masked(to_fixed(add.detach()), active)
    graph = z_q * h_float + add
    new_float = straight_through(to_float(new_fixed, graph.dtype), graph)
    if active is not None:
        new_float = torch.where(active[:, None], new_float, h_float)
    return new_fixed, new_float


def exact_reverse(
    buffer: InfoBuffer, h_new: torch.Tensor, n: torch.Tensor, add: torch.Tensor, active: torch.Tensor | None
) -> torch.Tensor:
    """The h that :func:`exact_update` was given."""
    return buffer.divide(h_new - _masked(to_fixed(add), active), n, active)


def _masked(update: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    return update if active is None else torch.where(active[:, None], update, 0)


class RevGRUCell(nn.Module):
    """The parameters of one RevGRU layer: for each half, W (to [z; r]) and V (to g)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bits: int | None) -> None:
        super().__init__()
        half = hidden_size // 2
        self.gates = nn.ModuleList([nn.Linear(input_size + half, 2 * half) for _ in range(2)])
        self.candidates = nn.ModuleList([nn.Linear(input_size + half, half) for _ in range(2)])
        self.forget = ForgetGate(forget_bits)
        self.state_parts = 1  # h only

    @staticmethod
    def update_order(state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state halves in the order :meth:`step` updates them: h1, h2."""
        return list(state)

    def half_terms(
        self, i: int, x: torch.Tensor, other: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q, n, (1 - z_q) g) for half i, from x and the other half's value."""
        z_logits, r_logits = self.gates[i](torch.cat([x, other], -1)).chunk(2, -1)
        z_q, n = self.forget(z_logits)
        g = torch.tanh(self.candidates[i](torch.cat([x, torch.sigmoid(r_logits) * other], -1)))
        return z_q, n, (1 - z_q) * g

    def step(self, buffer, x, state, state_float, active):
        """One exact step. ``state`` = [h1, h2] (int64), ``state_float`` their float values."""
        (h1, h2), (f1, f2) = state, state_float
        z_q, n, add = self.half_terms(0, x, f2)
        h1, f1 = exact_update(buffer, h1, f1, z_q, n, add, active)
        z_q, n, add = self.half_terms(1, x, f1)
        h2, f2 = exact_update(buffer, h2, f2, z_q, n, add, active)
        return [h1, h2], [f1, f2]

    @torch.no_grad()
    def inverse(self, buffer, x, state, active):
        """The state before :meth:`step`, from the state after it (int64, bit for bit)."""
        h1, h2 = state
        _, n, add = self.half_terms(1, x, to_float(h1, x.dtype))
        h2 = exact_reverse(buffer, h2, n, add, active)
        _, n, add = self.half_terms(0, x, to_float(h2, x.dtype))
        h1 = exact_reverse(buffer, h1, n, add, active)
        return [h1, h2]

    reverse = inverse  # Deprecated name (one name for the inverse across revbits); goes in 0.3


class RevLSTMCell(nn.Module):
    """The parameters of one RevLSTM layer: for each half, U (to f, g, i, o, p)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bits: int | None) -> None:
        super().__init__()
        half = hidden_size // 2
        self.gates = nn.ModuleList([nn.Linear(input_size + half, 5 * half) for _ in range(2)])
        self.forget = ForgetGate(forget_bits)
        self.state_parts = 2  # h and c

    @staticmethod
    def update_order(state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The state halves [h1, h2, c1, c2] in the order :meth:`step` updates them: c1, h1, c2, h2."""
        h1, h2, c1, c2 = state
        return [c1, h1, c2, h2]

    def half_gates(self, i: int, x: torch.Tensor, other: torch.Tensor):
        f_logits, g_logits, i_logits, o_logits, p_logits = self.gates[i](torch.cat([x, other], -1)).chunk(5, -1)
        f_q, f_n = self.forget(f_logits)
        p_q, p_n = self.forget(p_logits)
        return f_q, f_n, torch.sigmoid(i_logits) * torch.tanh(g_logits), torch.sigmoid(o_logits), p_q, p_n

    def _half(self, i, buffer, x, other, h, c, h_float, c_float, active):
        f_q, f_n, c_add, o, p_q, p_n = self.half_gates(i, x, other)
        c, c_float = exact_update(buffer, c, c_float, f_q, f_n, c_add, active)
        h, h_float = exact_update(buffer, h, h_float, p_q, p_n, o * torch.tanh(c_float), active)
        return h, c, h_float, c_float

    def step(self, buffer, x, state, state_float, active):
        """One exact step. ``state`` = [h1, h2, c1, c2] (int64), ``state_float`` their values."""
        h1, h2, c1, c2 = state
        f_h1, f_h2, f_c1, f_c2 = state_float
        h1, c1, f_h1, f_c1 = self._half(0, buffer, x, f_h2, h1, c1, f_h1, f_c1, active)
        h2, c2, f_h2, f_c2 = self._half(1, buffer, x, f_h1, h2, c2, f_h2, f_c2, active)
        return [h1, h2, c1, c2], [f_h1, f_h2, f_c1, f_c2]

    def _reverse_half(self, i, buffer, x, other, h, c, active):
        f_q, f_n, c_add, o, p_q, p_n = self.half_gates(i, x, other)
        h = exact_reverse(buffer, h, p_n, o * torch.tanh(to_float(c, x.dtype)), active)
        c = exact_reverse(buffer, c, f_n, c_add, active)
        return h, c

    @torch.no_grad()
    def inverse(self, buffer, x, state, active):
        """The state before :meth:`step`, from the state after it (int64, bit for bit)."""
        h1, h2, c1, c2 = state
        h2, c2 = self._reverse_half(1, buffer, x, to_float(h1, x.dtype), h2, c2, active)
        h1, c1 = self._reverse_half(0, buffer, x, to_float(h2, x.dtype), h1, c1, active)
        return [h1, h2, c1, c2]

    reverse = inverse  # Deprecated name (one name for the inverse across revbits); goes in 0.3
