"""RevGRU and RevLSTM cells: one time step in exact fixed point, forward, reverse and backward.

The hidden state is split in halves h = [h1; h2] (and c = [c1; c2] for the LSTM). Half 1 is
updated from x and the old h2, then half 2 from x and the new h1 (MacKay et al. 2018):

    RevGRU half:  [z; r] = sigma(W [x; h_other]),  g = tanh(V [x; r * h_other])
                  h <- z * h + (1 - z) * g
    RevLSTM half: [f; g; i; o; p] = gates(U [x; h_other])  (g tanh, the rest sigma)
                  c <- f * c + i * g,   h <- p * h + o * tanh(c)

The arithmetic of one update is in :mod:`.fixed_point`. Forward, reversal and the autograd
reference compute a half's gates with the same function, so they agree bit for bit. Reversal
recomputes the gates of a half from x and the other half, subtracts the additive part and
divides by n through the buffer.

Backward does not re-run the step under autograd: the reversal has just computed every gate of
the step, so :meth:`backward` back-propagates by hand through the float expression that
``step`` builds under autograd (h_new = z_q h + add, z_q straight-through to z). Its gradients
are autograd's up to the order in which float contributions are summed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .fixed_point import (
    FORGET_BITS,
    GATE_BITS,
    ForgetGate,
    exact_reverse,
    exact_update,
    fixed_complement_product,
    fixed_product,
    state_float,
    to_float,
    update_gradients,
)
from .fused import loaded_ops, native_ops
from .info_buffer import InfoBuffer
from .linear import CellLinear

__all__ = ["FORGET_BITS", "LinearGradients", "ParameterGradients", "RevGRUCell", "RevLSTMCell", "to_float"]

tanh_backward = torch.ops.aten.tanh_backward
sigmoid_backward = torch.ops.aten.sigmoid_backward
tanh_backward_into = torch.ops.aten.tanh_backward.grad_input


class LinearGradients:
    """Running sums of dL/dW and dL/db of one linear layer over the steps of a backward."""

    def __init__(self, linear: CellLinear) -> None:
        self.linear = linear
        self.weight, self.bias = linear.weight, linear.bias
        self.grad_weight = torch.zeros_like(self.weight)
        self.bias_rows: torch.Tensor | None = None  # dL/d(output) summed over steps, per row

    def add(self, grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """Adds dL/dW = grad_out^T inputs and dL/db = sum(grad_out); returns dL/d inputs."""
        self.grad_weight.addmm_(grad_out.t(), inputs)
        if self.bias_rows is None:
            self.bias_rows = grad_out.clone()
        else:
            self.bias_rows.add_(grad_out)
        return self.linear.input_gradient(grad_out)

    def totals(self) -> dict[torch.Tensor, torch.Tensor]:
        grad_bias = torch.zeros_like(self.bias) if self.bias_rows is None else self.bias_rows.sum(0)
        return {self.weight: self.grad_weight, self.bias: grad_bias}


class ParameterGradients:
    """The :class:`LinearGradients` of every linear layer of a cell, per half."""

    def __init__(self, weights: list[list[CellLinear]]) -> None:
        self.halves = [[LinearGradients(linear) for linear in half] for half in weights]

    def of(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The sums in the order of ``params``."""
        totals = {}
        for half in self.halves:
            for linear in half:
                totals.update(linear.totals())
        return [totals[p] for p in params]


class _Cell(nn.Module):
    """What both cells share: their linear layers per half, read as plain tensors once per run."""

    def half_linears(self) -> list[list[nn.Linear]]:
        raise NotImplementedError

    def weights(self) -> list[list[CellLinear]]:
        """Per half, each linear layer as a :class:`CellLinear` (module calls cost more than the step's ops)."""
        return [[CellLinear(linear.weight, linear.bias) for linear in half] for half in self.half_linears()]


class GRUHalf(NamedTuple):
    """The gates of one RevGRU half-update: h <- z_q h + (1 - z_q) g, z_q = n / 2**10 (``n`` is None where the
    native operators computed them: they use ``n_float``)."""

    n: torch.Tensor | None  # int64
    add: torch.Tensor  # (1 - z_q) g in fixed point
    n_float: torch.Tensor
    s: torch.Tensor  # sigma of [z; r]'s logits
    g: torch.Tensor
    xo: torch.Tensor  # [x; other], the input of W
    xro: torch.Tensor  # [x; r * other], the input of V


class RevGRUCell(_Cell):
    """The parameters of one RevGRU layer: for each half, W (to [z; r]) and V (to g)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bits: int | None) -> None:
        super().__init__()
        half = hidden_size // 2
        self.input_size, self.half = input_size, half
        self.gates = nn.ModuleList([nn.Linear(input_size + half, 2 * half) for _ in range(2)])
        self.candidates = nn.ModuleList([nn.Linear(input_size + half, half) for _ in range(2)])
        self.forget = ForgetGate(forget_bits)
        self.state_parts = 1  # h only

    def half_linears(self) -> list[list[nn.Linear]]:
        return [[self.gates[i], self.candidates[i]] for i in range(2)]

    def half_terms(self, weights: list[CellLinear], x: torch.Tensor, other: torch.Tensor, ops=None) -> GRUHalf:
        """The gates of a half with linear layers ``weights`` (W, V), from x and the other half's value (``ops``:
        :func:`~.fused.native_ops`, or None for the Python path)."""
        w, v = weights
        xo = torch.cat([x, other], -1)
        if ops is not None:
            s, numerators, r_other = ops.gru_gates(w(xo), other, self.forget.keep, self.forget.lowest)
            xro = torch.cat([x, r_other], -1)
            g, add = ops.gru_candidate(v(xro), numerators)
            return GRUHalf(None, add, numerators, s, g, xo, xro)
        s = torch.sigmoid(w(xo))
        n_float = self.forget.numerator(s[:, : self.half])
        xro = torch.cat([x, s[:, self.half :] * other], -1)
        g = torch.tanh(v(xro))
        return GRUHalf(n_float.to(torch.int64), fixed_complement_product(n_float, g), n_float, s, g, xo, xro)

    def _update(self, buffer, h, h_float, t: GRUHalf, active):
        if t.n is None:  # the native operators' gates
            new, word, value = loaded_ops().fixed_update(
                h, t.n_float, t.add, buffer.word_to_multiply(active), active, h_float.dtype
            )
            buffer.multiplied(word)
            return new, value
        new = exact_update(buffer, h, t.n, t.add, active)
        graph = None
        if torch.is_grad_enabled():  # the autograd reference: z_q h + (1 - z_q) g
            z_q = self.forget.quantised(t.n_float, t.s[:, : self.half])
            graph = z_q * h_float + (1 - z_q) * t.g
        return new, state_float(new, h_float, graph, active)

    def step(self, buffer: InfoBuffer, x, state, state_float, active, weights=None):
        """One exact step. ``state`` = [h1, h2] (int64), ``state_float`` their float values;
        ``weights``: :meth:`weights`, read once per run by the caller (read here if None)."""
        first, second = weights or self.weights()
        (h1, h2), (f1, f2), ops = state, state_float, native_ops(x, buffer)
        h1, f1 = self._update(buffer, h1, f1, self.half_terms(first, x, f2, ops), active)
        h2, f2 = self._update(buffer, h2, f2, self.half_terms(second, x, f1, ops), active)
        return [h1, h2], [f1, f2]

    def inverse(self, buffer: InfoBuffer, x, state, active, saved: list | None = None, weights=None):
        """The state before :meth:`step`, from the state after it (int64, bit for bit). With
        ``saved`` (a list), appends what :meth:`backward` needs. Call it under torch.no_grad()."""
        first_weights, second_weights = weights or self.weights()
        (h1, h2), ops = state, native_ops(x, buffer)
        second = self.half_terms(second_weights, x, to_float(h1, x.dtype), ops)
        h2 = self._reverse(ops, buffer, h2, second, active)
        before2 = to_float(h2, x.dtype)
        first = self.half_terms(first_weights, x, before2, ops)
        h1 = self._reverse(ops, buffer, h1, first, active)
        if saved is not None:
            saved.extend([first, second, to_float(h1, x.dtype), before2])
        return [h1, h2]

    reverse = inverse  # Deprecated name (one name for the inverse across revbits); goes in 0.3

    @staticmethod
    def _reverse(ops, buffer: InfoBuffer, h: torch.Tensor, t: GRUHalf, active) -> torch.Tensor:
        """The h that :meth:`_update` was given, by the native operators where ``ops`` (then ``t`` is theirs)."""
        if ops is None:
            return exact_reverse(buffer, h, t.n, t.add, active)
        h, word = ops.fixed_reverse(h, t.n_float, t.add, buffer.word, active)
        buffer.divided(word)
        return h

    @staticmethod
    def hidden_before(saved: list) -> list[torch.Tensor]:
        """The float [h1, h2] before the step that :meth:`inverse` reversed into ``saved``."""
        return saved[2:4]

    def backward(self, saved: list, grads: list[torch.Tensor], active, sums: ParameterGradients):
        """dL/d(state before) and dL/dx of the step that :meth:`inverse` reversed (``saved``), from
        ``grads`` = dL/d[h1, h2] after it; adds the parameter gradients to ``sums``. Under torch.no_grad()."""
        first, second, before1, before2 = saved
        grad1, grad2 = grads
        grad2, grad_after1, grad_x = self._half_backward(second, before2, grad2, active, sums.halves[1])
        grad1, grad_before2, grad_x1 = self._half_backward(first, before1, grad1 + grad_after1, active, sums.halves[0])
        return [grad1, grad2 + grad_before2], grad_x + grad_x1

    def _half_backward(self, t: GRUHalf, h_old: torch.Tensor, grad_new, active, sums: list[LinearGradients]):
        """(dL/dh_old, dL/d other, dL/dx) of h_new = z_q h_old + (1 - z_q) g."""
        gates, candidates = sums
        if t.n is None:  # reversed by the native operators
            ops = loaded_ops()
            grad_old, grad_update, grad_candidate = ops.gru_candidate_grads(grad_new, t.n_float, t.g, active)
            grad_xro = candidates.add(grad_candidate, t.xro)
            grad_gates = ops.gru_gate_grads(grad_update, h_old, t.g, grad_xro, t.xo, t.s, self.forget.keep)
            grad_xo = gates.add(grad_gates, t.xo)
            grad_ro = grad_xro[:, self.input_size :]
            grad_other = grad_xo[:, self.input_size :] + grad_ro * t.s[:, self.half :]
            return grad_old, grad_other, grad_xo[:, : self.input_size] + grad_xro[:, : self.input_size]
        z_q = t.n_float * 2.0**-GATE_BITS
        grad_old, grad_update = update_gradients(grad_new, z_q, active)
        grad_xro = candidates.add(tanh_backward(grad_update * (1 - z_q), t.g), t.xro)
        grad_ro, other = grad_xro[:, self.input_size :], t.xo[:, self.input_size :]
        grad_s = torch.cat([self.forget.scaled_gradient(grad_update * (h_old - t.g)), grad_ro * other], -1)
        grad_xo = gates.add(sigmoid_backward(grad_s, t.s), t.xo)
        grad_other = grad_xo[:, self.input_size :] + grad_ro * t.s[:, self.half :]
        return grad_old, grad_other, grad_xo[:, : self.input_size] + grad_xro[:, : self.input_size]


class LSTMHalf(NamedTuple):
    """The gates of one RevLSTM half-update: c <- f_q c + sigma(i) tanh(g), h <- p_q h + o tanh(c).

    The native operators keep only what they use: ``n`` is None, ``n_float`` holds f's and p's numerators,
    [B, 2H], and after a whole-half inverse (``lstm_half_inverse``) only ``n_float`` and ``xo`` are kept."""

    n: torch.Tensor | None  # int64 numerators of all five gate slots; f's and p's are used
    c_add: torch.Tensor | None  # sigma(i) tanh(g) in fixed point
    n_float: torch.Tensor
    s: torch.Tensor | None  # sigma of all five logits (g's slot unused)
    tg: torch.Tensor | None  # tanh of g's logits
    xo: torch.Tensor  # [x; other], the input of U


class RevLSTMCell(_Cell):
    """The parameters of one RevLSTM layer: for each half, U (to f, g, i, o, p)."""

    def __init__(self, input_size: int, hidden_size: int, forget_bits: int | None) -> None:
        super().__init__()
        half = hidden_size // 2
        self.input_size, self.half = input_size, half
        self.gates = nn.ModuleList([nn.Linear(input_size + half, 5 * half) for _ in range(2)])
        self.forget = ForgetGate(forget_bits)
        self.state_parts = 2  # h and c

    def half_linears(self) -> list[list[nn.Linear]]:
        return [[self.gates[i]] for i in range(2)]

    def _slot(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Gate slot k of [f, g, i, o, p]."""
        return t[:, k * self.half : (k + 1) * self.half]

    def half_terms(self, weights: list[CellLinear], x: torch.Tensor, other: torch.Tensor, ops=None) -> LSTMHalf:
        """The gates of a half with linear layer ``weights`` (U), from x and the other half's value (``ops``:
        :func:`~.fused.native_ops`, or None for the Python path)."""
        (u,) = weights
        xo = torch.cat([x, other], -1)
        logits = u(xo)
        if ops is not None:
            c_add, numerators, s, tg = ops.lstm_terms(logits, self.forget.keep, self.forget.lowest)
            return LSTMHalf(None, c_add, numerators, s, tg, xo)
        s = torch.sigmoid(logits)
        n_float = self.forget.numerator(s)  # all slots in one op; only f's and p's are used
        tg = torch.tanh(self._slot(logits, 1))
        return LSTMHalf(n_float.to(torch.int64), fixed_product(self._slot(s, 2), tg), n_float, s, tg, xo)

    def _graph(self, t: LSTMHalf, k: int, old_float: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
        """The float expression z_q old + add of the update gated by slot k (for autograd)."""
        return self.forget.quantised(self._slot(t.n_float, k), self._slot(t.s, k)) * old_float + add

    def _half(self, weights, buffer, x, other, h, c, h_float, c_float, active):
        ops = native_ops(x, buffer)
        if ops is not None:
            return self._native_half(ops, weights, buffer, x, other, h, c, active)
        t = self.half_terms(weights, x, other)
        traced = torch.is_grad_enabled()  # the reference: also build the float graph
        new_c = exact_update(buffer, c, self._slot(t.n, 0), t.c_add, active)
        graph = self._graph(t, 0, c_float, self._slot(t.s, 2) * t.tg) if traced else None
        c_float = state_float(new_c, c_float, graph, active)
        o, tanh_c = self._slot(t.s, 3), torch.tanh(c_float)
        h_add = fixed_product(o.detach(), tanh_c.detach()) if traced else fixed_product(o, tanh_c)
        new_h = exact_update(buffer, h, self._slot(t.n, 4), h_add, active)
        graph = self._graph(t, 4, h_float, o * tanh_c) if traced else None
        h_float = state_float(new_h, h_float, graph, active)
        return new_h, new_c, h_float, c_float

    def _native_half(self, ops, weights, buffer, x, other, h, c, active):
        """:meth:`_half` by native operators (no graph): c <- c f_q + fixed(s_i tg), h <- h p_q + fixed(o tanh c);
        in one call, product included, where the host bound shows neither multiplication can spill."""
        word = buffer.word_to_multiply(active)
        if buffer.second_multiply_unchecked():
            new_h, new_c, h_float, c_float, word = ops.lstm_half_step(
                x, other, *weights[0].native_args(x.dtype), self.forget.keep, self.forget.lowest, c, h, word, active
            )
            buffer.multiplied(word)
            return new_h, new_c, h_float, c_float
        t = self.half_terms(weights, x, other, ops)
        new_c, word, c_float = ops.fixed_update(c, self._slot(t.n_float, 0), t.c_add, word, active, x.dtype)
        buffer.multiplied(word)
        new_h, word, h_float = ops.lstm_h_update(t.s, t.n_float, c_float, h, buffer.word_to_multiply(active), active)
        buffer.multiplied(word)
        return new_h, new_c, h_float, c_float

    def step(self, buffer: InfoBuffer, x, state, state_float, active, weights=None):
        """One exact step. ``state`` = [h1, h2, c1, c2] (int64), ``state_float`` their values;
        ``weights``: :meth:`weights`, read once per run by the caller (read here if None)."""
        first, second = weights or self.weights()
        h1, h2, c1, c2 = state
        f_h1, f_h2, f_c1, f_c2 = state_float
        h1, c1, f_h1, f_c1 = self._half(first, buffer, x, f_h2, h1, c1, f_h1, f_c1, active)
        h2, c2, f_h2, f_c2 = self._half(second, buffer, x, f_h1, h2, c2, f_h2, f_c2, active)
        return [h1, h2, c1, c2], [f_h1, f_h2, f_c1, f_c2]

    def _reverse_half(self, weights, buffer, x, other, h, c, active):
        ops = native_ops(x, buffer)
        if ops is not None:
            return self._native_reverse_half(ops, weights, buffer, x, other, h, c, active)
        t = self.half_terms(weights, x, other)
        tanh_c = torch.tanh(to_float(c, x.dtype))
        o = self._slot(t.s, 3)
        h = exact_reverse(buffer, h, self._slot(t.n, 4), fixed_product(o, tanh_c), active)
        c = exact_reverse(buffer, c, self._slot(t.n, 0), t.c_add, active)
        h_old = to_float(h, x.dtype)
        saved = (t, self._gate_derivatives(t, tanh_c, h_old, c), h_old, tanh_backward(o, tanh_c))
        return h, c, saved

    def _native_reverse_half(self, ops, weights, buffer, x, other, h, c, active):
        """:meth:`_reverse_half` by native operators: h, then c, divided back, and what backward needs; in one
        call, product included, where neither multiplication spilled."""
        if buffer.last_two_unspilled():
            h, c, word, h_old, derivatives, tanh_derivative, numerators, xo = ops.lstm_half_inverse(
                x,
                other,
                *weights[0].native_args(x.dtype),
                self.forget.keep,
                self.forget.lowest,
                c,
                h,
                buffer.word,
                active,
            )
            buffer.divided(word, times=2)
            return h, c, (LSTMHalf(None, None, numerators, None, None, xo), derivatives, h_old, tanh_derivative)
        t = self.half_terms(weights, x, other, ops)
        h, word, tanh_c = ops.lstm_h_reverse(t.s, t.n_float, c, h, buffer.word, active)
        buffer.divided(word)
        c, word, h_old, derivatives, tanh_derivative = ops.lstm_c_reverse(
            t.s, t.n_float, t.tg, tanh_c, c, t.c_add, h, buffer.word, active, self.forget.keep
        )
        buffer.divided(word)
        return h, c, (t, derivatives, h_old, tanh_derivative)

    def _gate_derivatives(self, t: LSTMHalf, tanh_c, h_old, c_old_fixed) -> torch.Tensor:
        """D with dL/d logits = [dc, dc, dc, dh, dh] * D per gate slot [f, g, i, o, p], dc and dh the
        gradients that reach the c and h updates: D = [k c_old s_f', s_i tanh'(g), tg s_i', tanh(c) s_o',
        k h_old s_p'] with s' = s (1 - s) and k = dz / d sigma = 1 - keep."""
        slope = self.forget.slope
        c_old = to_float(c_old_fixed, h_old.dtype, slope)
        factors = torch.cat([c_old, t.tg, t.tg, tanh_c, h_old * slope if self.forget.keep else h_old], -1)
        derivatives = sigmoid_backward(factors, t.s)
        tanh_backward_into(self._slot(t.s, 2), t.tg, grad_input=self._slot(derivatives, 1))  # g's slot: tanh
        return derivatives

    def inverse(self, buffer: InfoBuffer, x, state, active, saved: list | None = None, weights=None):
        """The state before :meth:`step`, from the state after it (int64, bit for bit). With
        ``saved`` (a list), appends what :meth:`backward` needs. Call it under torch.no_grad()."""
        first_weights, second_weights = weights or self.weights()
        h1, h2, c1, c2 = state
        h2, c2, second = self._reverse_half(second_weights, buffer, x, to_float(h1, x.dtype), h2, c2, active)
        h1, c1, first = self._reverse_half(first_weights, buffer, x, second[2], h1, c1, active)
        if saved is not None:
            saved.extend([first, second])
        return [h1, h2, c1, c2]

    reverse = inverse  # Deprecated name (one name for the inverse across revbits); goes in 0.3

    @staticmethod
    def hidden_before(saved: list) -> list[torch.Tensor]:
        """The float [h1, h2] before the step that :meth:`inverse` reversed into ``saved``."""
        return [saved[0][2], saved[1][2]]

    def backward(self, saved: list, grads: list[torch.Tensor], active, sums: ParameterGradients):
        """dL/d(state before) and dL/dx of the step that :meth:`inverse` reversed (``saved``), from
        ``grads`` = dL/d[h1, h2, c1, c2] after it; adds the parameter gradients to ``sums``.
        Under torch.no_grad()."""
        first, second = saved
        grad_h1, grad_h2, grad_c1, grad_c2 = grads
        grad_h2, grad_c2, grad_after1, grad_x = self._half_backward(second, grad_h2, grad_c2, active, sums.halves[1])
        grad_h1, grad_c1, grad_before2, grad_x1 = self._half_backward(
            first, grad_h1 + grad_after1, grad_c1, active, sums.halves[0]
        )
        return [grad_h1, grad_h2 + grad_before2, grad_c1, grad_c2], grad_x + grad_x1

    def _half_backward(self, saved, grad_h, grad_c, active, sums: list[LinearGradients]):
        """(dL/dh_old, dL/dc_old, dL/d other, dL/dx) of one half-update."""
        t, derivatives, _, tanh_derivative = saved  # tanh_derivative: o tanh'(c), dh_new / dc_new
        if t.n is None:  # reversed by the native operators: its numerators are f's and p's only
            gradients = sums[0]
            weight, weight_t, _, onednn = gradients.linear.native_args(t.xo.dtype)
            grad_h_old, grad_c_old, grad_xo, gradients.bias_rows = loaded_ops().lstm_half_backprop(
                grad_h,
                grad_c,
                t.n_float,
                tanh_derivative,
                derivatives,
                active,
                t.xo,
                gradients.grad_weight,
                gradients.bias_rows,
                weight,
                weight_t,
                onednn,
            )
            return grad_h_old, grad_c_old, grad_xo[:, self.input_size :], grad_xo[:, : self.input_size]
        z_q = t.n_float * 2.0**-GATE_BITS
        grad_h_old, grad_h_update = update_gradients(grad_h, self._slot(z_q, 4), active)
        grad_c = torch.addcmul(grad_c, grad_h_update, tanh_derivative)
        grad_c_old, grad_c_update = update_gradients(grad_c, self._slot(z_q, 0), active)
        updates = [grad_c_update, grad_c_update, grad_c_update, grad_h_update, grad_h_update]
        grad_logits = torch.cat(updates, -1).mul_(derivatives)
        grad_xo = sums[0].add(grad_logits, t.xo)
        return grad_h_old, grad_c_old, grad_xo[:, self.input_size :], grad_xo[:, : self.input_size]
