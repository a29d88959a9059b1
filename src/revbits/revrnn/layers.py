"""RevGRU and RevLSTM: multi-layer reversible RNNs that store only the final state, the
information buffers and the inputs.

Training runs the exact fixed-point forward without a graph. Backward walks time in reverse:
at step t it re-runs the readout (if any) on the top state, then reverses each layer from the
top down (layer l's input at t is layer l-1's state at t, not yet reversed), re-runs the step
with gradients from the rebuilt state and back-propagates. ``rnn.reversible = False`` runs the
same forward under plain autograd, the reference for the gradients.

A *readout* is a per-step function of the top layer's output, r_t = readout(h_t, t, *inputs),
run inside the reversible loop: its backward is re-run at step t from the rebuilt h_t, so
nothing downstream has to keep the T hidden states (the paper's decoder computes its attention
and loss this way). It must give the same result when called again with the same arguments.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .cells import ParameterGradients, RevGRUCell, RevLSTMCell
from .fixed_point import FORGET_BITS, GATE_BITS, STATE_BITS, STATE_LIMIT, to_fixed, to_float
from .info_buffer import InfoBuffer
from .stages import run_stages, workers_for


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


class _RangeCheck:
    """|state integer| < STATE_LIMIT for every state element, read from the states only when a host
    bound cannot vouch for it (no host sync at most steps).

    An update moves a state integer by at most 2**23 + 2**11: the buffer's h n / 2**10 is
    floor(h / 2**10) n + (W mod n), within 2**11 of |h| n / 2**10 <= |h|, and the rounded additive
    part (1 - z) g, i g or o tanh(c) is at most 1 in value. So after each time step (one update per
    state part) the largest |state| grows by at most that much, and the states are read only when
    the bound reaches the limit (after about 255 steps from states of size 1), which resets it.
    """

    GROWTH = 2**STATE_BITS + 2 ** (GATE_BITS + 1)

    def __init__(self, states: list[list[torch.Tensor]]) -> None:
        self.bound = self._largest(states)

    @staticmethod
    def _largest(states: list[list[torch.Tensor]]) -> int:
        parts = [part for state in states for part in state if part.numel()]
        return int(torch.stack([part.abs().amax() for part in parts]).amax()) if parts else 0

    def step(self, states: list[list[torch.Tensor]]) -> None:
        """After a time step of every layer: raise if a state left the range."""
        self.bound += self.GROWTH
        if self.bound < STATE_LIMIT:
            return
        self.bound = self._largest(states)
        if self.bound >= STATE_LIMIT:
            raise StateRangeError(
                "a RevGRU/RevLSTM state left the fixed-point range |v| < 256 (2**31 at 2**-23 steps); "
                "the cell state grows without a forget gate below 1: lower the learning rate, clip "
                "gradients or use a smaller forget_bits"
            )


class _Run:
    """The forward of every layer over time, exact; the state it leaves is what backward reverses."""

    def __init__(
        self,
        rnn: _RevRNNBase,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        initial: list[torch.Tensor],
        readout: nn.Module | None = None,
        readout_inputs: tuple[torch.Tensor, ...] = (),
    ):
        self.rnn, self.x, self.mask = rnn, x, mask
        self.readout, self.readout_inputs = readout, readout_inputs
        batch, half = x.shape[1], rnn.hidden_size // 2
        max_bits = rnn.forget_bits or GATE_BITS
        self.buffers = [
            InfoBuffer((batch, half), x.device, max_bits_per_step=max_bits, track_information=rnn.track_information)
            for _ in rnn.cells
        ]
        # per layer: [h1, h2] or [h1, h2, c1, c2] as int64
        self.states = [[to_fixed(part) for part in state] for state in _split_layers(initial, len(rnn.cells))]

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

    def output(self, hidden: torch.Tensor, t: int, readout_inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The output at step t from the top layer's float state [h1; h2]: itself (zero where the row
        has finished), or the readout of it."""
        active = self.active(t)
        if active is not None:
            hidden = torch.where(active[:, None], hidden, 0)
        return hidden if self.readout is None else self.readout(hidden, t, *readout_inputs)

    def forward(
        self, floats: list[list[torch.Tensor]], readout_inputs: tuple[torch.Tensor, ...] | None = None
    ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Outputs [T, B, ...] and each layer's final float state, from the states' float values.

        Layer l's step t needs layer l-1's step t: one after another, stage t runs every layer's step t;
        with the layers on threads (no graph, no readout), stage s runs layer l's step s - l."""
        readout_inputs = self.readout_inputs if readout_inputs is None else readout_inputs
        cells, steps = self.rnn.cells, self.x.shape[0]
        weights = [cell.weights() for cell in cells]
        checks = [_RangeCheck([state]) for state in self.states]
        outputs: list = [None] * steps
        passed: dict[tuple[int, int], torch.Tensor] = {}  # (layer, t): its output at t, the next layer's input

        def step(layer: int, t: int) -> None:
            inputs = self.x[t] if layer == 0 else passed.pop((layer - 1, t))
            self.states[layer], floats[layer] = cells[layer].step(
                self.buffers[layer], inputs, self.states[layer], floats[layer], self.active(t), weights[layer]
            )
            checks[layer].step([self.states[layer]])
            hidden = torch.cat(floats[layer][:2], -1)
            if layer == len(cells) - 1:
                outputs[t] = self.output(hidden, t, readout_inputs)
            else:
                passed[layer, t] = hidden

        workers = workers_for(len(cells), self.readout is None and not torch.is_grad_enabled())
        lag = 1 if workers > 1 else 0
        stages = [
            [partial(step, layer, s - lag * layer) for layer in range(len(cells)) if 0 <= s - lag * layer < steps]
            for s in range(steps + lag * (len(cells) - 1))
        ]
        run_stages(stages, workers)
        return torch.stack(outputs), floats


class _ReversibleRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, *tensors: torch.Tensor):  # type: ignore[override]
        with torch.no_grad():
            out, floats = run.forward(run.initial_floats())
        ctx.run = run
        ctx.save_for_backward(run.x, *run.readout_inputs)
        return (out, *_join_layers(floats))

    @staticmethod
    @torch.no_grad()  # the hand-written backward builds no graph (also under create_graph)
    def backward(ctx, grad_out: torch.Tensor, *grad_finals: torch.Tensor):  # type: ignore[override]
        run: _Run = ctx.run
        ctx.run = None
        x, *readout_inputs = ctx.saved_tensors
        params = [list(cell.parameters()) for cell in run.rnn.cells]
        first_readout_input = 2 + len(grad_finals) + sum(len(ps) for ps in params)
        readout = _ReadoutGradients(run, readout_inputs, ctx.needs_input_grad[first_readout_input:])
        walk = _BackwardWalk(run, x, grad_out, _split_layers(list(grad_finals), len(params)), readout)
        walk.execute(workers_for(len(params), run.readout is None))
        grad_initial = _join_layers(walk.grads)
        flat_params = [g for s, ps in zip(walk.sums, params) for g in s.of(ps)]
        return (None, walk.grad_x, *grad_initial, *flat_params, *readout.input_grads, *readout.param_grads)


class _BackwardWalk:
    """Backward through time: each layer reverses its steps (V) and back-propagates through them (G).

    V(l, t) rebuilds layer l's state before step t from the one after it; its input is layer l-1's state
    after step t, which V(l-1, t+1) rebuilt. G(l, t) back-propagates step t from the gates V(l, t) computed
    and the gradient of the state after t, to which G(l+1, t) added what reached layer l's output. One after
    another, stage k does V and G of every layer at t = T-1-k, top layer first; with the layers on threads,
    V runs ahead of the top by the layer's depth below it and G behind it, so each stage's tasks are
    independent (V(l-1, t+1) two stages before V(l, t); G(l+1, t) one stage before G(l, t)).
    """

    def __init__(self, run: _Run, x, grad_out, grads, readout: _ReadoutGradients) -> None:
        self.run, self.x, self.grad_out, self.grads, self.readout = run, x, grad_out, grads, readout
        self.cells = run.rnn.cells
        self.weights = [cell.weights() for cell in self.cells]
        self.sums = [ParameterGradients(w) for w in self.weights]
        self.grad_x = torch.zeros_like(x)
        top = len(self.cells) - 1
        # (layer, t): the float [h1, h2] of a layer after step t, the input of the layer above at t
        self.hidden = {
            (layer, x.shape[0] - 1): [to_float(s, x.dtype) for s in state[:2]]
            for layer, state in enumerate(run.states[:top])
        }
        self.saved: dict[tuple[int, int], list] = {}
        self.pending: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, t): dL/d[h1, h2] from above

    def reverse(self, layer: int, t: int) -> None:
        """V(layer, t); for the top layer first the readout's (or the output's) gradient at t."""
        run, cell = self.run, self.cells[layer]
        if layer == len(self.cells) - 1:
            self.pending[layer, t] = self.readout.top_gradients(t, self.grad_out[t])
        inputs = self.x[t] if layer == 0 else torch.cat(self.hidden.pop((layer - 1, t)), -1)
        saved: list = []
        run.states[layer] = cell.inverse(
            run.buffers[layer], inputs, run.states[layer], run.active(t), saved, self.weights[layer]
        )
        self.saved[layer, t] = saved
        if layer < len(self.cells) - 1 and t > 0:
            self.hidden[layer, t - 1] = cell.hidden_before(saved)

    def backprop(self, layer: int, t: int) -> None:
        """G(layer, t): dL/d(state before t) of the layer, dL/dx_t (layer 0) or what reaches the layer below."""
        grads, (above_1, above_2) = self.grads[layer], self.pending.pop((layer, t))
        grads[0], grads[1] = grads[0] + above_1, grads[1] + above_2
        self.grads[layer], grad_in = self.cells[layer].backward(
            self.saved.pop((layer, t)), grads, self.run.active(t), self.sums[layer]
        )
        if layer == 0:
            self.grad_x[t] = grad_in
        else:
            self.pending[layer - 1, t] = _halves(grad_in)

    def execute(self, workers: int) -> None:
        steps, top = self.x.shape[0], len(self.cells) - 1
        lag = 1 if workers > 1 else 0

        def layer_task(layer: int, k: int):
            ahead, behind = steps - 1 - k - lag * (top - layer), steps - 1 - k + lag * (top - layer)

            def task() -> None:
                if 0 <= ahead < steps:
                    self.reverse(layer, ahead)
                if 0 <= behind < steps:
                    self.backprop(layer, behind)

            return task if 0 <= ahead < steps or 0 <= behind < steps else None

        stages = []
        for k in range(-lag * top, steps + lag * top):
            tasks = [layer_task(layer, k) for layer in range(top, -1, -1)]
            stages.append([task for task in tasks if task is not None])
        run_stages(stages, workers)


class _ReadoutGradients:
    """Back-propagates the readout at step t from the rebuilt top state, accumulating the
    gradients of its inputs and parameters; without a readout, passes the output gradient on."""

    def __init__(self, run: _Run, inputs: list[torch.Tensor], needs_grad: tuple[bool, ...]) -> None:
        self.run, self.inputs = run, inputs
        self.params = [] if run.readout is None else list(run.readout.parameters())
        self.wants = list(needs_grad[: len(inputs)])  # ctx.needs_input_grad of the readout inputs
        self.input_grads = [torch.zeros_like(i) if want else None for i, want in zip(inputs, self.wants)]
        self.param_grads = [torch.zeros_like(p) for p in self.params]

    def top_gradients(self, t: int, grad_output: torch.Tensor) -> list[torch.Tensor]:
        """dL/d[h1, h2] of the top layer at step t, from the gradient of the step's output."""
        run, active = self.run, self.run.active(t)
        if run.readout is None:
            return _halves(grad_output if active is None else torch.where(active[:, None], grad_output, 0))
        with torch.enable_grad():
            leaves = [to_float(s, run.x.dtype).requires_grad_() for s in run.states[-1][:2]]
            inputs = [i.detach().requires_grad_(want) for i, want in zip(self.inputs, self.wants)]
            output = run.output(torch.cat(leaves, -1), t, tuple(inputs))
            wanted = [i for i in inputs if i.requires_grad]
            found = torch.autograd.grad(output, [*leaves, *wanted, *self.params], grad_output, allow_unused=True)
        found_inputs = iter(found[2 : 2 + len(wanted)])
        for k, want in enumerate(self.wants):
            g = next(found_inputs) if want else None
            if g is not None:
                self.input_grads[k] += g
        for acc, g in zip(self.param_grads, found[2 + len(wanted) :]):
            if g is not None:
                acc += g
        return [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(found[:2], leaves)]


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

    def _run(
        self,
        x: torch.Tensor | PackedSequence,
        state: Any,
        lengths: torch.Tensor | None,
        readout: nn.Module | None,
        readout_inputs: tuple[torch.Tensor, ...],
    ):
        packed = x if isinstance(x, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError("a PackedSequence carries its own lengths; do not pass lengths as well")
            if readout is not None:
                raise ValueError("a readout needs padded input and lengths, not a PackedSequence")
            x, lengths = pad_packed_sequence(packed, batch_first=self.batch_first)
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
            if lengths.shape != (x.shape[1],):
                raise ValueError(
                    f"lengths must have shape [{x.shape[1]}] (one per sequence), got {list(lengths.shape)}"
                )
            steps = torch.arange(x.shape[0], device=x.device)[:, None]
            mask = steps < lengths.to(x.device)[None, :]
        initial = self._initial(x, state)
        run = _Run(self, x, mask, [i.detach() for i in initial], readout, tuple(readout_inputs))
        params = list(self.parameters())
        readout_params = [] if readout is None else list(readout.parameters())
        if (
            self.reversible
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in (x, *initial, *params, *readout_inputs, *readout_params))
        ):
            self.last_run = run
            out, *finals = _ReversibleRNN.apply(run, x, *initial, *params, *readout_inputs, *readout_params)
        else:  # the reference: the same exact forward under autograd
            out, floats = run.forward(run.initial_floats(initial))
            finals = _join_layers(floats)
        if self.batch_first:
            out = out.transpose(0, 1)
        if packed is not None:
            out = pack_padded_sequence(out, lengths, batch_first=self.batch_first, enforce_sorted=False)
        return out, finals


class RevGRU(_RevRNNBase):
    """``out, h_n = RevGRU(input_size, hidden_size, num_layers, forget_bits=3)(x, h0, lengths=None)``.

    Shapes as nn.GRU: x [T, B, input_size] ([B, T, ...] with batch_first) or a PackedSequence,
    out [T, B, H] (a PackedSequence for packed input), h_n [num_layers, B, H]. ``lengths`` ([B])
    masks finished sequences: their state stops and their outputs are zero. With ``readout``,
    out[t] = readout(out_t, t, *readout_inputs) is computed inside the reversible loop (see the
    module docstring).
    """

    cell_type = RevGRUCell

    def forward(
        self,
        x: torch.Tensor | PackedSequence,
        h0: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        readout: nn.Module | None = None,
        readout_inputs: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor | PackedSequence, torch.Tensor]:
        out, (h_n,) = self._run(x, h0, lengths, readout, readout_inputs)
        return out, h_n


class RevLSTM(_RevRNNBase):
    """``out, (h_n, c_n) = RevLSTM(...)(x, (h0, c0), lengths=None)``, shapes as nn.LSTM; the
    other arguments as :class:`RevGRU`."""

    cell_type = RevLSTMCell

    def forward(
        self,
        x: torch.Tensor | PackedSequence,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        lengths: torch.Tensor | None = None,
        readout: nn.Module | None = None,
        readout_inputs: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor | PackedSequence, tuple[torch.Tensor, torch.Tensor]]:
        out, (h_n, c_n) = self._run(x, state, lengths, readout, readout_inputs)
        return out, (h_n, c_n)
