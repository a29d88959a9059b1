"""The reversible RNNs' fast paths: oneDNN products and the host's bound on the buffer word.

Each must keep the reversal bit-exact and the gradients those of plain autograd on the same forward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import revbits.revrnn.linear as cell_linear
from helpers import relative_error
from revbits.measure import OperatorCount
from revbits.revrnn import RevGRU, RevLSTM
from revbits.revrnn.info_buffer import InfoBuffer
from revbits.revrnn.linear import CellLinear

CLASSES = [RevGRU, RevLSTM]



@pytest.fixture
def every_layer_on_onednn(monkeypatch):
    """Send every cell product through oneDNN (the tests' layers are below the size threshold)."""
    monkeypatch.setattr(cell_linear, "ONEDNN_MIN_OUTPUTS", 0)
    monkeypatch.setattr(cell_linear, "use_onednn", torch.backends.mkldnn.is_available())


def test_a_cell_product_has_the_same_bits_with_and_without_autograd(every_layer_on_onednn):
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 24, requires_grad=True), torch.randn(40, requires_grad=True)
    x = torch.randn(7, 24, requires_grad=True)
    linear = CellLinear(weight, bias)
    assert linear.onednn == torch.backends.mkldnn.is_available()
    with torch.no_grad():
        plain = linear(x)
    traced = linear(x)
    assert torch.equal(traced.detach(), plain)  # the reference sees the forward's bits
    probe = torch.randn(7, 40)
    found = torch.autograd.grad((traced * probe).sum(), [x, weight, bias])
    expected = torch.autograd.grad((F.linear(x, weight, bias) * probe).sum(), [x, weight, bias])
    assert all(torch.equal(a, b) for a, b in zip(found, expected))  # F.linear's gradient, straight through
    assert relative_error(plain, F.linear(x, weight, bias).detach()) <= 1e-6
    assert relative_error(linear.input_gradient(probe), probe @ weight.detach()) <= 1e-6


def test_float64_products_use_f_linear(every_layer_on_onednn):
    weight, bias = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    x = torch.randn(7, 24, dtype=torch.float64)
    assert not CellLinear(weight, bias).onednn
    assert torch.equal(CellLinear(weight, bias)(x), F.linear(x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_off_onednn_have_f_linears_bits_with_and_without_autograd(dtype, monkeypatch):
    monkeypatch.setattr(cell_linear, "use_onednn", False)
    torch.manual_seed(1)
    weight = torch.randn(37, 29, dtype=dtype, requires_grad=True)
    bias = torch.randn(37, dtype=dtype, requires_grad=True)
    x = torch.randn(13, 29, dtype=dtype)
    linear = CellLinear(weight, bias)
    expected = F.linear(x, weight, bias).detach()
    with torch.no_grad():
        assert torch.equal(linear(x), expected)
    assert torch.equal(linear(x).detach(), expected)


def _reversible_and_reference(cls, seed: int = 3):
    """Outputs and gradients of the reversible run (its buffers emptied by the backward) and of the reference."""
    torch.manual_seed(seed)
    rnn = cls(6, 12, num_layers=2, forget_bits=3)
    x = torch.randn(30, 3, 6, requires_grad=True)
    lengths = torch.tensor([30, 11, 24])
    results = []
    for reversible in (True, False):
        rnn.reversible = reversible
        x.grad = None
        rnn.zero_grad(set_to_none=True)
        out, _ = rnn(x, lengths=lengths)
        out.square().sum().backward()
        if reversible:
            assert all(buffer.empty for buffer in rnn.last_run.buffers)  # every step reversed exactly
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in rnn.parameters()]))
    return results


@pytest.mark.parametrize("cls", CLASSES)
def test_onednn_products_reverse_exactly_and_get_the_reference_gradients(cls, every_layer_on_onednn):
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = _reversible_and_reference(cls)
    assert torch.equal(out_a, out_b)
    assert relative_error(gx_a, gx_b) <= 1e-5
    assert max(relative_error(a, b) for a, b in zip(gp_a, gp_b)) <= 1e-5


def test_a_gate_multiplication_far_from_a_spill_does_not_read_the_word():
    """With host decisions the bound on W stands in for a comparison, a reduction and a host sync."""
    buffer = InfoBuffer((4, 8), max_bits_per_step=3)
    h = torch.randint(-(2**30), 2**30, (4, 8))
    n = torch.randint(128, 1025, (4, 8))
    buffer.multiply(h, n)  # the first call reads the word (the bound starts unknown after construction)
    with OperatorCount() as counter:
        buffer.multiply(h, n)
    assert counter.count <= 6  # &, add, div, addcmul, >>, addcmul


def test_the_bound_spills_exactly_where_a_check_at_every_push_spills():
    """Host decisions through the bound against device decisions (a comparison at every push), with
    masked rows and gates at the lowest numerator so words fill as fast as they can."""
    generator = torch.Generator().manual_seed(4)
    buffers = [InfoBuffer((6, 5), max_bits_per_step=3, host_decides=host) for host in (True, False)]
    h = [torch.randint(-(2**31), 2**31, (6, 5), generator=generator)] * 2
    history = []
    for step in range(300):
        n = torch.randint(128, 1025, (6, 5), generator=generator)
        n[:, 0] = 128  # one unit loses all 3 bits every step
        active = torch.rand(6, generator=generator) < (0.3 if step % 50 < 25 else 0.9)
        history.append((h[0], n, active))
        h = [buffer.multiply(value, n, active) for buffer, value in zip(buffers, h)]
        assert torch.equal(h[0], h[1]) and torch.equal(buffers[0].word, buffers[1].word)
    assert int(buffers[0].depth) == int(buffers[1].depth) >= 10
    for h_before, n, active in reversed(history):
        h = [buffer.divide(value, n, active) for buffer, value in zip(buffers, h)]
        assert torch.equal(h[0], h_before) and torch.equal(h[1], h_before)
    assert all(buffer.empty for buffer in buffers)


def _open_gates_lstm() -> RevLSTM:
    """A RevLSTM whose forget and input gates are open: c grows by about 1 per step."""
    rnn = RevLSTM(4, 8, forget_bits=None)
    with torch.no_grad():
        for cell in rnn.cells:
            for linear in cell.gates:
                linear.bias.fill_(50.0)
    return rnn


def test_a_state_near_the_range_limit_is_not_an_error_and_one_beyond_it_is():
    """The host bound on |state| reads the states once it reaches the limit: a state that ends at
    about 250 passes, one that crosses 256 a few steps later is caught (at the step it crosses)."""
    from revbits.revrnn import StateRangeError

    rnn = _open_gates_lstm()
    start = (torch.zeros(1, 1, 8), torch.full((1, 1, 8), 200.0))
    with torch.no_grad():
        _, (_, c_n) = rnn(torch.randn(50, 1, 4), start)
    assert 240 < c_n.max().item() < 256
    with pytest.raises(StateRangeError, match="fixed-point range"):
        with torch.no_grad():
            rnn(torch.randn(60, 1, 4), start)


def test_the_range_check_does_not_read_the_states_at_every_step():
    """Within about 255 steps of states of size 1 the host bound vouches for the range: a run of 40
    steps reads the states (abs, amax) as often as one of 20, and tracks no extremes per step."""
    torch.manual_seed(0)
    rnn = RevLSTM(4, 8, num_layers=2)
    x = torch.randn(40, 2, 4)
    counts = []
    for steps in (20, 40):
        with torch.no_grad(), OperatorCount() as names:
            rnn(x[:steps])
        counts.append(names.by_name)
    for name in ("aten.abs.default", "aten.amax.default"):
        assert counts[0][name] == counts[1][name] > 0
    assert not any("minimum" in name or "maximum" in name for name in counts[1])


def test_onednn_products_cost_no_memory(monkeypatch):
    """The products' path holds nothing extra (no per-layer copy of a weight) through the step."""
    from revbits.measure import measure_training_step

    peaks = []
    for onednn in (True, False):
        monkeypatch.setattr(cell_linear, "ONEDNN_MIN_OUTPUTS", 0)
        monkeypatch.setattr(cell_linear, "use_onednn", onednn and torch.backends.mkldnn.is_available())
        torch.manual_seed(0)
        rnn = RevLSTM(8, 16, num_layers=2)
        x = torch.randn(6, 2, 8, requires_grad=True)
        report = measure_training_step(rnn, lambda r=rnn, x=x: r(x)[0].square().sum())
        peaks.append((report.activations, report.held_after_forward))
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("cls", CLASSES)
def test_an_empty_batch_runs_through_the_host_bounds(cls):
    """The bounds on the buffer word and on |state| read no maximum of an empty tensor."""
    rnn = cls(4, 8, num_layers=2)
    x = torch.randn(5, 0, 4, requires_grad=True)
    out, _ = rnn(x)
    out.sum().backward()
    assert out.shape == (5, 0, 8) and x.grad.shape == (5, 0, 4)


def test_onednn_layers_take_the_input_gradient_from_onednn_too(every_layer_on_onednn):
    """On oneDNN layers the input gradient dL/dy W is oneDNN's product with the view W^T (no torch.mm): per step
    and half the forward, the reversal and the input gradient go through oneDNN, the weight gradient through addmm_."""
    torch.manual_seed(0)
    rnn = RevLSTM(6, 12, num_layers=2)
    x = torch.randn(9, 3, 6, requires_grad=True)
    with OperatorCount() as counter:
        rnn(x)[0].square().sum().backward()
    half_steps = 2 * rnn.num_layers * x.shape[0]
    assert counter.by_name["mkldnn._linear_pointwise.default"] == 3 * half_steps
    assert counter.by_name["aten.addmm_.default"] == half_steps
    assert "aten.mm.default" not in counter.by_name
