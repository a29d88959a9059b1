"""RevGRU and RevLSTM: bit-exact reversal, gradients equal to plain autograd, masks, errors."""

from __future__ import annotations

import pytest
import torch

from helpers import relative_error
from revbits.revrnn import RevGRU, RevLSTM, StateRangeError, make_rnn, run_readout
from revbits.revrnn.cells import to_float
from revbits.revrnn.fixed_point import ForgetGate, fixed_complement_product, fixed_product, to_fixed
from revbits.revrnn.info_buffer import InfoBuffer
from revbits.revrnn.layers import _Run

CLASSES = [RevGRU, RevLSTM]


def run_both(rnn, x, lengths=None, state=None):
    """Outputs and gradients of the reversible run and of the plain-autograd reference."""
    results = []
    for reversible in (True, False):
        rnn.reversible = reversible
        x.grad = None
        rnn.zero_grad(set_to_none=True)
        out, final = rnn(x, state, lengths=lengths)
        finals = [final] if isinstance(final, torch.Tensor) else list(final)
        (out.square().mean() + sum(f.sin().sum() for f in finals)).backward()
        results.append(
            (out.detach(), [f.detach() for f in finals], x.grad.clone(), [p.grad.clone() for p in rnn.parameters()])
        )
    return results


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("forget_bits", [1, 2, 3, 5, None])
@pytest.mark.parametrize("layers", [1, 2])
def test_reversed_states_equal_forward_states_at_every_step(cls, forget_bits, layers):
    torch.manual_seed(0)
    rnn = cls(6, 12, num_layers=layers, forget_bits=forget_bits)
    x = torch.randn(40, 3, 6)
    lengths = torch.tensor([40, 17, 33])
    mask = torch.arange(40)[:, None] < lengths[None, :]
    initial = [torch.randn(layers, 3, 12) * 0.5 for _ in range(rnn.cells[0].state_parts)]
    run = _Run(rnn, x, mask, initial)
    history = []
    with torch.no_grad():
        for t in range(40):
            history.append([[s.clone() for s in state] for state in run.states])
            inputs = x[t]
            for layer, cell in enumerate(rnn.cells):
                floats = [to_float(s) for s in run.states[layer]]
                run.states[layer], floats = cell.step(run.buffers[layer], inputs, run.states[layer], floats, mask[t])
                inputs = torch.cat(floats[:2], -1)
        for t in range(39, -1, -1):
            for layer in range(layers - 1, -1, -1):
                inputs = x[t] if layer == 0 else torch.cat([to_float(s) for s in run.states[layer - 1][:2]], -1)
                run.states[layer] = rnn.cells[layer].reverse(run.buffers[layer], inputs, run.states[layer], mask[t])
            for rebuilt, kept in zip(run.states, history[t]):
                assert all(torch.equal(a, b) for a, b in zip(rebuilt, kept))
    assert all(buffer.empty for buffer in run.buffers)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("forget_bits", [3, None])
@pytest.mark.slow
def test_gradients_equal_plain_autograd_over_200_steps(cls, forget_bits):
    torch.manual_seed(1)
    rnn = cls(8, 16, num_layers=2, forget_bits=forget_bits)
    x = torch.randn(200, 4, 8, requires_grad=True)
    (out_a, fin_a, gx_a, gp_a), (out_b, fin_b, gx_b, gp_b) = run_both(rnn, x)
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(fin_a, fin_b))
    assert relative_error(gx_a, gx_b) <= 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_a, gp_b)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fixed_point_shortcuts_equal_rounding_through_float64(dtype):
    """to_float, to_fixed, the gate numerator (unclamped where forget_bits bounds it), the fixed-point (1 - z) g
    and the fixed-point product of two gates skip the float64 detour or an operator;
    each gives the detour's result bit for bit, including halfway cases."""
    generator = torch.Generator().manual_seed(0)
    ties = (torch.randint(2**23, 2**24, (20000,), generator=generator) << 7) + 64  # half an ulp of float32 at 2**30
    h = torch.cat([ties, -ties, ties + 1, torch.randint(-(2**31), 2**31, (20000,), generator=generator)])
    assert torch.equal(to_float(h, dtype), (h.double() / 2**23).to(dtype))
    scales = 10.0 ** torch.randint(-9, 2, (50000,), generator=generator)
    v = (torch.randn(50000, generator=generator, dtype=torch.float64) * scales).to(dtype)
    assert torch.equal(to_fixed(v), torch.round(v.double() * 2**23).long())
    for forget_bits in (1, 3, 5, None):
        gate = ForgetGate(forget_bits)
        s = torch.cat([torch.rand(50000, generator=generator, dtype=dtype), torch.tensor([0.0, 1.0], dtype=dtype)])
        z = (1 - gate.keep) * s + gate.keep  # the gate as written, then rounded to n / 2**10
        n = gate.numerator(s)
        assert torch.equal(n.long(), torch.round(z.double() * 2**10).long().clamp(gate.lowest, 2**10))
        g = torch.rand(50002, generator=generator, dtype=dtype) * 2 - 1
        assert torch.equal(fixed_complement_product(n, g), to_fixed((1 - n / 2**10) * g))
        assert torch.equal(fixed_product(s, g), to_fixed(s * g))
    tiny = torch.finfo(dtype).tiny  # products below the normal range round to 0 either way
    a = torch.tensor([tiny, 2 * tiny, 0.5, -1.0, 1.0, 0.0, 2**-60], dtype=dtype)
    b = torch.tensor([0.5, -(2**-30), tiny, tiny, -1.0, -0.0, 2**-70], dtype=dtype)
    assert torch.equal(fixed_product(a, b), to_fixed(a * b))


@pytest.mark.parametrize("cls", CLASSES)
def test_float64_runs_reverse_exactly_and_get_the_reference_gradients(cls):
    torch.manual_seed(7)
    rnn = cls(5, 8, num_layers=2).double()
    x = torch.randn(30, 3, 5, dtype=torch.float64, requires_grad=True)
    (out_a, fin_a, gx_a, gp_a), (out_b, fin_b, gx_b, gp_b) = run_both(rnn, x, lengths=torch.tensor([30, 12, 21]))
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(fin_a, fin_b))
    assert relative_error(gx_a, gx_b) <= 1e-12
    assert max(relative_error(a, b) for a, b in zip(gp_a, gp_b)) <= 1e-12


@pytest.mark.parametrize("cls", CLASSES)
def test_spill_decisions_on_the_device_train_as_on_the_host(cls, monkeypatch):
    """The accelerator's way of deciding spills (on the device), run on the CPU: same outputs, same
    gradients, same stored bits as the CPU's host decisions, over enough steps to spill."""
    import functools

    import revbits.revrnn.layers as layers

    results = []
    for host_decides in (True, False):
        monkeypatch.setattr(layers, "InfoBuffer", functools.partial(InfoBuffer, host_decides=host_decides))
        torch.manual_seed(9)
        rnn = cls(4, 8, num_layers=2, forget_bits=5)
        x = torch.randn(120, 3, 4, requires_grad=True)
        out, _ = rnn(x, lengths=torch.tensor([120, 70, 99]))
        stored = sum(buffer.stored_bits() for buffer in rnn.last_run.buffers)
        assert sum(int(buffer.depth) for buffer in rnn.last_run.buffers) > 0  # some words spilled
        out.square().sum().backward()
        assert all(buffer.empty for buffer in rnn.last_run.buffers)
        results.append((out.detach(), stored, x.grad, [p.grad for p in rnn.parameters()]))
    (out_a, stored_a, gx_a, gp_a), (out_b, stored_b, gx_b, gp_b) = results
    assert torch.equal(out_a, out_b) and stored_a == stored_b
    assert torch.equal(gx_a, gx_b) and all(torch.equal(a, b) for a, b in zip(gp_a, gp_b))


@pytest.mark.parametrize("cls", CLASSES)
def test_masked_sequences_and_initial_state_get_the_same_gradients(cls):
    torch.manual_seed(2)
    rnn = cls(5, 10, num_layers=2, batch_first=True)
    x = torch.randn(3, 25, 5, requires_grad=True)
    parts = rnn.cells[0].state_parts
    state = [(torch.randn(2, 3, 10) * 0.3).requires_grad_() for _ in range(parts)]
    lengths = torch.tensor([25, 9, 1])
    results = []
    for reversible in (True, False):
        for s in state:
            s.grad = None
        rnn.reversible = reversible
        out, final = rnn(x, state[0] if parts == 1 else tuple(state), lengths=lengths)
        assert out.shape == (3, 25, 10) and torch.equal(out[1, 9:], torch.zeros(16, 10))
        finals = [final] if parts == 1 else list(final)
        (out.square().sum() + sum(f.sum() for f in finals)).backward()
        results.append([s.grad.clone() for s in state])
    assert all(relative_error(a, b) <= 1e-5 for a, b in zip(*results))


class ContextLoss(torch.nn.Module):
    """A readout that uses a context tensor and integer targets: CE(W [h; mean(context)], y_t)."""

    def __init__(self, hidden: int, width: int, classes: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden + width, classes)

    def forward(self, h, t, context, targets):
        logits = self.linear(torch.cat([h, context.mean(1)], -1))
        return torch.nn.functional.cross_entropy(logits, targets[t], reduction="none")


@pytest.mark.parametrize("cls", CLASSES)
def test_a_readout_inside_the_reversible_loop_gets_the_reference_gradients(cls):
    torch.manual_seed(5)
    rnn = cls(6, 12, num_layers=2, batch_first=True)
    readout = ContextLoss(12, 4, 7)
    x = torch.randn(3, 30, 6, requires_grad=True)
    context = torch.randn(3, 5, 4, requires_grad=True)
    targets = torch.randint(7, (30, 3))
    lengths = torch.tensor([30, 11, 20])
    results = []
    for reversible in (True, False):
        rnn.reversible = reversible
        for t in (x, context, *rnn.parameters(), *readout.parameters()):
            t.grad = None
        losses, final = rnn(x, lengths=lengths, readout=readout, readout_inputs=(context, targets))
        assert losses.shape == (3, 30)
        losses.sum().backward()
        grads = [x.grad, context.grad, *(p.grad for p in (*rnn.parameters(), *readout.parameters()))]
        results.append((losses.detach(), [g.clone() for g in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert max(relative_error(a, b) for a, b in zip(grads_a, grads_b)) <= 1e-5


@pytest.mark.parametrize("cls", CLASSES)
def test_packed_sequences_give_what_padding_and_lengths_give(cls):
    torch.manual_seed(6)
    rnn = cls(4, 8, batch_first=True)
    x = torch.randn(3, 10, 4, requires_grad=True)
    lengths = torch.tensor([6, 10, 3])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_packed, final_packed = rnn(packed)
    assert isinstance(out_packed, torch.nn.utils.rnn.PackedSequence)
    out_packed, got_lengths = torch.nn.utils.rnn.pad_packed_sequence(out_packed, batch_first=True, total_length=10)
    out_padded, final_padded = rnn(x, lengths=lengths)
    assert torch.equal(got_lengths, lengths) and torch.equal(out_packed, out_padded)
    finals = [(final_packed, final_padded)] if cls is RevGRU else list(zip(final_packed, final_padded))
    assert all(torch.equal(a, b) for a, b in finals)
    out_packed.sum().backward()
    grad_packed = x.grad.clone()
    x.grad = None
    out_padded.sum().backward()
    assert torch.equal(grad_packed, x.grad)
    with pytest.raises(ValueError, match="own lengths"):
        rnn(packed, lengths=lengths)


def test_a_finished_sequence_keeps_its_state():
    torch.manual_seed(3)
    rnn = RevGRU(4, 8)
    x = torch.randn(12, 2, 4)
    with torch.no_grad():
        _, h_short = rnn(x, lengths=torch.tensor([12, 5]))
        _, h_cut = rnn(x[:5])
    assert torch.equal(h_short[:, 1], h_cut[:, 1])


def test_the_buffer_keeps_few_bits_per_unit_and_step():
    torch.manual_seed(4)
    rnn = RevGRU(8, 64, num_layers=1, forget_bits=3)
    x = torch.randn(300, 8, 8, requires_grad=True)
    out, _ = rnn(x)
    stored = sum(b.stored_bits() for b in rnn.last_run.buffers)
    baseline = 32 * 300 * 8 * 64
    assert baseline / stored >= 32 / 3 * 0.8  # at most about 3 bits per unit and step, in whole words
    out.sum().backward()


@pytest.mark.parametrize("forget_bits", [0, 4, 2.5, "3"])
def test_bad_forget_bits_is_named(forget_bits):
    with pytest.raises(ValueError, match="forget_bits must be one of 1, 2, 3, 5 or None"):
        RevGRU(4, 8, forget_bits=forget_bits)


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match="hidden_size must be even"):
        RevLSTM(4, 7)
    rnn = RevGRU(4, 8)
    with pytest.raises(ValueError, match=r"expected input of shape \[T, B, 4\]"):
        rnn(torch.randn(3, 2, 5))
    with pytest.raises(ValueError, match="NaN"):
        rnn(torch.full((3, 2, 4), float("nan")))
    with pytest.raises(ValueError, match="initial state"):
        rnn(torch.randn(3, 2, 4), torch.zeros(2, 2, 8))


def test_a_state_beyond_the_fixed_point_range_is_an_error():
    rnn = RevLSTM(4, 8, forget_bits=None)
    with torch.no_grad():
        for cell in rnn.cells:
            for linear in cell.gates:
                linear.bias.fill_(50.0)  # forget gates open, input gates open: c grows by 1 per step
    with pytest.raises(StateRangeError, match="fixed-point range"):
        rnn(torch.randn(300, 1, 4), (torch.zeros(1, 1, 8), torch.full((1, 1, 8), 200.0)))


class Unwrapped(torch.nn.Module):
    """The same RNN seen as any other RNN, so run_readout takes its generic path."""

    def __init__(self, rnn: torch.nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x, state):
        return self.rnn(x, state)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_rnn_switch_runs_a_readout_inside_the_loop_or_after_with_the_same_result(cell):
    rnn = make_rnn(cell, "reversible", 12, 2, 3)
    torch.manual_seed(5)
    readout = ContextLoss(12, 4, 7)
    x = torch.randn(3, 9, 12, requires_grad=True)
    context = torch.randn(3, 5, 4)
    targets = torch.randint(7, (9, 3))
    full = torch.tensor([9, 9, 9])  # every step real: torch's RNNs run them all
    results = []
    for runner in (rnn, Unwrapped(rnn)):  # inside the reversible loop, then after the whole sequence
        for t in (x, *rnn.parameters(), *readout.parameters()):
            t.grad = None
        losses = run_readout(runner, x, None, readout, (context, targets), full)
        assert losses.shape == (3, 9)
        losses.sum().backward()
        grads = [x.grad, *(p.grad for p in (*rnn.parameters(), *readout.parameters()))]
        results.append((losses.detach(), [g.clone() for g in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert max(relative_error(a, b) for a, b in zip(grads_a, grads_b)) <= 1e-5
    assert isinstance(make_rnn(cell, "standard", 12, 2, 3), torch.nn.GRU if cell == "gru" else torch.nn.LSTM)


def test_the_rnn_switch_names_a_bad_cell_or_memory_mode():
    with pytest.raises(ValueError, match="cell must be one of gru, lstm, got 'rnn'"):
        make_rnn("rnn", "standard", 8, 1, 3)
    with pytest.raises(ValueError, match="an RNN's memory mode is one of standard, reversible, got 'bdia'"):
        make_rnn("gru", "bdia", 8, 1, 3)
