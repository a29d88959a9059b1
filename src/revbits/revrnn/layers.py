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

Under ``torch.compile(model)`` dynamo stays out of the stack (``torch.compiler.disable``): the forward, the
reversal and the reference run eagerly, so the reversal recomputes each step with the kernels the forward
used, and the rest of the model is compiled around it. Compiled kernels may round a gate otherwise (inductor's
sigmoid and tanh are not ATen's), and a forward compiled but reversed eagerly would rebuild wrong states. The
backward checks that its reversal ended on the forward's initial state and empty buffers, and raises
:class:`~revbits.ReversibilityError` where it did not. torch.autocast, which does not reach the backward's
reversal, is switched off inside the stack: it computes in its parameters' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ..errors import ReversibilityError
from .cells import ParameterGradients, RevGRUCell, RevLSTMCell
from .fixed_point import FORGET_BITS, GATE_BITS, STATE_BITS, STATE_LIMIT, to_fixed, to_float
from .info_buffer import InfoBuffer


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
        """Outputs [T, B, ...] and each layer's final float state, from the states' float values."""
        readout_inputs = self.readout_inputs if readout_inputs is None else readout_inputs
        weights = [cell.weights() for cell in self.rnn.cells]
        in_range = _RangeCheck(self.states)
        outputs = []
        for t in range(self.x.shape[0]):
            inputs, active = self.x[t], self.active(t)
            for layer, cell in enumerate(self.rnn.cells):
                self.states[layer], floats[layer] = cell.step(
                    self.buffers[layer], inputs, self.states[layer], floats[layer], active, weights[layer]
                )
                inputs = torch.cat(floats[layer][:2], -1)
            in_range.step(self.states)
            outputs.append(self.output(inputs, t, readout_inputs))
        return torch.stack(outputs), floats


def _check_rebuilt(run: _Run, initial: list[list[torch.Tensor]]) -> None:
    """Raise :class:`ReversibilityError` unless the reversal ended where the forward began: every layer's
    state equal to its initial state and its buffer empty. A reversal that computes other bits than the
    forward (a kernel that is not deterministic, a forward run by other code) rebuilds wrong states, and
    the gradients back-propagated through them would be silently wrong; a wrong state at any step carries
    through to the first (one host sync per layer, at the end of the backward)."""
    for layer, (rebuilt, expected, buffer) in enumerate(zip(run.states, initial, run.buffers)):
        if not all(torch.equal(a, b) for a, b in zip(rebuilt, expected)) or not buffer.empty:
            raise ReversibilityError(
                f"layer {layer} of the {type(run.rnn).__name__}: the backward's reversal did not rebuild the "
                "initial state, so the forward and the reversal computed different bits; the gradients of this "
                "step would be wrong"
            )


class _ReversibleRNN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Run, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.initial = [[part.clone() for part in state] for state in run.states]  # for _check_rebuilt
        with torch.no_grad():
            out, floats = run.forward(run.initial_floats())
        ctx.run = run
        ctx.save_for_backward(run.x, *run.readout_inputs)
        return (out, *_join_layers(floats))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor, *grad_finals: torch.Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: the hand-written backward would return constants
            raise RuntimeError(
                "RevGRU/RevLSTM compute first-order gradients only: the backward rebuilds the states and "
                "back-propagates by hand, which cannot be differentiated again; for create_graph=True "
                "(higher-order gradients) set `rnn.reversible = False` (plain autograd on the same forward)"
            )
        run: _Run | None = ctx.run
        if run is None:
            raise RuntimeError(
                "RevGRU/RevLSTM: backward already ran for this forward and used up its stored bits "
                "(retain_graph=True is not supported); run the forward again"
            )
        ctx.run = None
        # no graph, and the forward's arithmetic: outside autocast (a backward called under it would enter it)
        with torch.no_grad(), torch.autocast(run.x.device.type, enabled=False):
            return _backward(ctx, run, grad_out, grad_finals)


def _backward(ctx, run: _Run, grad_out: torch.Tensor, grad_finals: tuple[torch.Tensor, ...]) -> tuple:
    """The reversible backward: time in reverse, each layer from the top reversed and back-propagated."""
    x, *readout_inputs = ctx.saved_tensors
    cells = run.rnn.cells
    params = [list(cell.parameters()) for cell in cells]
    grads = _split_layers(list(grad_finals), len(cells))
    weights = [cell.weights() for cell in cells]
    sums = [ParameterGradients(w) for w in weights]
    hidden = [[to_float(s, x.dtype) for s in state[:2]] for state in run.states]  # float [h1, h2] per layer
    grad_x = torch.zeros_like(x)
    first_readout_input = 2 + len(grad_finals) + sum(len(ps) for ps in params)
    readout = _ReadoutGradients(run, readout_inputs, ctx.needs_input_grad[first_readout_input:])
    for t in range(x.shape[0] - 1, -1, -1):
        active = run.active(t)
        top = readout.top_gradients(t, grad_out[t])
        grads[-1][0], grads[-1][1] = grads[-1][0] + top[0], grads[-1][1] + top[1]
        for layer in range(len(cells) - 1, -1, -1):
            cell = cells[layer]
            inputs = x[t] if layer == 0 else torch.cat(hidden[layer - 1], -1)
            saved: list = []
            run.states[layer] = cell.inverse(
                run.buffers[layer], inputs, run.states[layer], active, saved, weights[layer]
            )
            hidden[layer] = cell.hidden_before(saved)
            grads[layer], grad_in = cell.backward(saved, grads[layer], active, sums[layer])
            if layer == 0:
                grad_x[t] = grad_in
            else:
                below = _halves(grad_in)
                grads[layer - 1][0] = grads[layer - 1][0] + below[0]
                grads[layer - 1][1] = grads[layer - 1][1] + below[1]
    _check_rebuilt(run, ctx.initial)
    ctx.initial = None
    grad_initial = _join_layers(grads)
    flat_params = [g for s, ps in zip(sums, params) for g in s.of(ps)]
    return (None, grad_x, *grad_initial, *flat_params, *readout.input_grads, *readout.param_grads)


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

    @torch.compiler.disable  # the exact stack runs eagerly under torch.compile (see the module docstring)
    def _run(self, *args: Any) -> tuple[Any, list[torch.Tensor]]:
        """:meth:`_run_exact` outside torch.autocast: its products must be the same in the forward, the reversal
        and the reference, and autocast does not reach the backward's reversal, so under autocast the stack
        computes in its parameters' dtype (its input and initial state cast to it)."""
        parameter = next(self.parameters())
        autocast = torch.is_autocast_enabled(parameter.device.type)
        with torch.autocast(parameter.device.type, enabled=False):
            return self._run_exact(*args, cast_to=parameter.dtype if autocast else None)

    def _run_exact(
        self,
        x: torch.Tensor | PackedSequence,
        state: Any,
        lengths: torch.Tensor | None,
        readout: nn.Module | None,
        readout_inputs: tuple[torch.Tensor, ...],
        cast_to: torch.dtype | None = None,
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
        if cast_to is not None:  # under autocast the input may come in autocast's dtype
            x, initial = x.to(cast_to), [i.to(cast_to) for i in initial]
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
