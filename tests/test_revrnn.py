"""RevGRU and RevLSTM: bit-exact reversal, gradients equal to plain autograd, masks, errors."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error
from revbits.revrnn import RevGRU, RevLSTM, StateRangeError
from revbits.revrnn.cells import to_float
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
def test_gradients_equal_plain_autograd_over_200_steps(cls, forget_bits):
    torch.manual_seed(1)
    rnn = cls(8, 16, num_layers=2, forget_bits=forget_bits)
    x = torch.randn(200, 4, 8, requires_grad=True)
    (out_a, fin_a, gx_a, gp_a), (out_b, fin_b, gx_b, gp_b) = run_both(rnn, x)
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(fin_a, fin_b))
    assert relative_error(gx_a, gx_b) <= 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_a, gp_b)) <= 1e-5


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
