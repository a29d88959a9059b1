"""RevGRU and RevLSTM: multi-layer reversible RNNs that store only the final state, the
information buffers and the inputs.

Training runs the exact fixed-point forward without a graph. Backward walks time in reverse:
at step t it reverses each layer from the top down (layer l's input at t is layer l-1's state
at t, not yet reversed), re-runs the step with gradients from the rebuilt state and
back-propagates. ``rnn.reversible = False`` runs the same forward under plain autograd, the
reference for the gradients.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..info_buffer import InfoBuffer
from .cells import (
    FORGET_BITS,
    GATE_BITS,
    STATE_LIMIT,
    Replay,
    RevGRUCell,
    RevLSTMCell,
    to_fixed,
    to_float,
)


class StateRangeError(OverflowError):
    """A fixed-point state left the representable range."""


def _halves(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.chunk(2, -1))


def _split_layers(whole: list[torch.Tensor], layers: int) -> list[list[torch.Tensor]]:
    """[h (, c)] of shape [L, B, H] -> per layer [h1, h2 (, c1, c2)]."""
    return [[half for t in whole for half in _halves(t[layer])] for layer in range(layers)]


def _join_layers(per_layer: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The inverse of :func:`_split_layers`."""
    parts = len(per_layer[0]) // 2
    return [torch.stack([torch.cat(f[2 * p : 2 * p + 2], -1) for f in per_layer]) for p in range(parts)]


class _Run:
    """The forward of every layer over time, exact; the state it leaves is what backward reverses."""

    def __init__(self, rnn: _RevRNNBase, x: torch.Tensor, mask: torch.Tensor | None, initial: list[torch.Tensor]):
        self.rnn, self.x, self.mask = rnn, x, mask
        batch, half = x.shape[1], rnn.hidden_size // 2
        max_bits = rnn.forget_bits or GATE_BITS
        self.buffers = [
            InfoBuffer((batch, half), x.device, max_bits_per_step=max_bits, track_information=rnn.track_information)
            for _ in rnn.cells
        ]
        # per layer: [h1, h2] or [h1, h2, c1, c2] as int64
        self.states = [[to_fixed(part) for part in state] for state in _split_layers(initial, len(rnn.cells))]
        self.out_of_range = torch.zeros((), dtype=torch.bool, device=x.device)

    def active(self, t: int) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[t]

    def initial_floats(self, initial: list[torch.Tensor] | None = None) -> list[list[torch.Tensor]]:
        """The float values of the states; with ``initial`` ([h (, c)]), carrying its gradient
        straight through (the reference forward)."""
        values = [[to_float(s, self.x.dtype) for s in state] for state in self.states]
        if initial is None:
            return values
        given = _split_layers(initial, len(self.states))
        return [[v + (g - g.detach()) for v, g in zip(vs, gs)] for vs, gs in zip(values, given)]

    def forward(self, floats: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Outputs [T, B, H] and each layer's final float state, from the states' float values."""
        outputs = []
        for t in range(self.x.shape[0]):
            inputs, active = self.x[t], self.active(t)
            for layer, cell in enumerate(self.rnn.cells):
                self.states[layer], floats[layer] = cell.step(
                    self.buffers[layer], inputs, self.states[layer], floats[layer], active
                )
                for s in self.states[layer]:
                    self.out_of_range |= (s.abs() >= STATE_LIMIT).any()
                inputs = torch.cat(floats[layer][:2], -1)
            outputs.append(inputs if active is None else torch.where(active[:, None], inputs, 0))
        if bool(self.out_of_range):
            raise StateRangeError(
                "a RevGRU/RevLSTM state left the fixed-point range |v| < 256 (2**31 at 2**-23 steps); "
                "the cell state grows without a forget gate below 1: lower the learning rate, clip "
                "gradients or use a smaller forget_bits"
            )
        return torch.stack(outputs), floats


class _ReversibleRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, *tensors: torch.Tensor):  # type: ignore[override]
        with torch.no_grad():
            out, floats = run.forward(run.initial_floats())
        ctx.run = run
        ctx.save_for_backward(run.x)
        return (out, *_join_layers(floats))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *grad_finals: torch.Tensor):  # type: ignore[override]
        run: _Run = ctx.run
        ctx.run = None
        (x,) = ctx.saved_tensors
        cells = run.rnn.cells
        params = [list(cell.parameters()) for cell in cells]
        grads = _split_layers(list(grad_finals), len(cells))
        param_grads = [[torch.zeros_like(p) for p in ps] for ps in params]
        grad_x = torch.zeros_like(x)
        for t in range(x.shape[0] - 1, -1, -1):
            active = run.active(t)
            top = _halves(grad_out[t] if active is None else torch.where(active[:, None], grad_out[t], 0))
            grads[-1][0], grads[-1][1] = grads[-1][0] + top[0], grads[-1][1] + top[1]
            for layer in range(len(cells) - 1, -1, -1):
                cell = cells[layer]
                if layer == 0:
                    inputs = x[t]
                else:
                    inputs = torch.cat([to_float(s, x.dtype) for s in run.states[layer - 1][:2]], -1)
                after = run.states[layer]
                before = cell.reverse(run.buffers[layer], inputs, after, active)
                with torch.enable_grad():
                    leaves = [to_float(s, x.dtype).requires_grad_() for s in before]
                    inputs = inputs.detach().requires_grad_()
                    _, new_floats = cell.step(Replay(cell.update_order(after)), inputs, before, leaves, active)
                    found = torch.autograd.grad(
                        new_floats, [*leaves, inputs, *params[layer]], grads[layer], allow_unused=True
                    )
                parts = len(leaves)
                grads[layer] = [
                    g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(found[:parts], leaves)
                ]
                grad_in = found[parts]
                for acc, g in zip(param_grads[layer], found[parts + 1 :]):
                    if g is not None:
                        acc += g
                if grad_in is not None:
                    if layer == 0:
                        grad_x[t] = grad_in
                    else:
                        below = _halves(grad_in)
                        grads[layer - 1][0] = grads[layer - 1][0] + below[0]
                        grads[layer - 1][1] = grads[layer - 1][1] + below[1]
                run.states[layer] = before
        grad_initial = _join_layers(grads)
        flat_params = [g for gs in param_grads for g in gs]
        return (None, grad_x, *grad_initial, *flat_params)


class _RevRNNBase(nn.Module):
    cell_type: type[nn.Module]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        forget_bits: int | None = 3,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        if forget_bits not in FORGET_BITS:
            raise ValueError(f"forget_bits must be one of 1, 2, 3, 5 or None (no limit), got {forget_bits!r}")
        if hidden_size < 2 or hidden_size % 2:
            raise ValueError(f"hidden_size must be even (the state is split in halves), got {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.forget_bits, self.batch_first = forget_bits, batch_first
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList([self.cell_type(size, hidden_size, forget_bits) for size in sizes])
        self.reversible = True
        self.track_information = False  # count the bits the gates destroy (benchmarks)
        self.last_run: _Run | None = None  # for memory accounting: buffers of the last training forward

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"forget_bits={self.forget_bits}, batch_first={self.batch_first}"
        )

    def _initial(self, x: torch.Tensor, given: Any) -> list[torch.Tensor]:
        parts = self.cells[0].state_parts
        shape = (self.num_layers, x.shape[1], self.hidden_size)
        if given is None:
            return [x.new_zeros(shape) for _ in range(parts)]
        given = [given] if isinstance(given, torch.Tensor) else list(given)
        if len(given) != parts or any(g.shape != shape for g in given):
            raise ValueError(f"initial state must be {parts} tensor(s) of shape {list(shape)}")
        return given

    def _run(self, x: torch.Tensor, state: Any, lengths: torch.Tensor | None):
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"expected input of shape [T, B, {self.input_size}] (or [B, T, ...] with batch_first), "
                f"got {list(x.shape)}"
            )
        if self.batch_first:
            x = x.transpose(0, 1)
        if not x.is_floating_point() or not torch.isfinite(x).all():
            raise ValueError("the input must be a finite floating tensor (found NaN, inf or an integer dtype)")
        mask = None
        if lengths is not None:
            steps = torch.arange(x.shape[0], device=x.device)[:, None]
            mask = steps < lengths.to(x.device)[None, :]
        initial = self._initial(x, state)
        run = _Run(self, x, mask, [i.detach() for i in initial])
        params = [p for p in self.parameters()]
        if (
            self.reversible
            and torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in params) or any(i.requires_grad for i in initial))
        ):
            self.last_run = run
            out, *finals = _ReversibleRNN.apply(run, x, *initial, *params)
        else:  # the reference: the same exact forward under autograd
            out, floats = run.forward(run.initial_floats(initial))
            finals = _join_layers(floats)
        if self.batch_first:
            out = out.transpose(0, 1)
        return out, finals


class RevGRU(_RevRNNBase):
    """``out, h_n = RevGRU(input_size, hidden_size, num_layers, forget_bits=3)(x, h0, lengths=None)``.

    Shapes as nn.GRU: x [T, B, input_size] ([B, T, ...] with batch_first), out [T, B, H],
    h_n [num_layers, B, H]. ``lengths`` ([B]) masks finished sequences: their state stops and
    their outputs are zero.
    """

    cell_type = RevGRUCell

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        out, (h_n,) = self._run(x, h0, lengths)
        return out, h_n


class RevLSTM(_RevRNNBase):
    """``out, (h_n, c_n) = RevLSTM(...)(x, (h0, c0), lengths=None)``, shapes as nn.LSTM."""

    cell_type = RevLSTMCell

    def forward(self, x: torch.Tensor, state=None, lengths: torch.Tensor | None = None):
        out, (h_n, c_n) = self._run(x, state, lengths)
        return out, (h_n, c_n)
