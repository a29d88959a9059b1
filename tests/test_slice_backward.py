"""revbits.bdia.slice_backward: a sliced block output back-propagated slice by slice while it is recomputed,
with the gradient BDIA's backward predicts, and again, slice by slice, when another gradient arrives."""

from __future__ import annotations

import pytest
import torch

from helpers import relative_error
from revbits.bdia.slice_backward import backpropagate_slices
from revbits.bdia.token_slices import slice_bounds

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem():
    """A position-wise map of a [2, 10, 6] input that also reads a shared tensor (as query slices read K and V)
    and a parameter: y[s] = tanh(a[s] W) + sum(b[:end(s)]) (b's prefix up to the slice's end, as causal keys)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 10, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(2, 10, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(6, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    calls = []

    def fn(a_part, b_whole, *, rows):
        calls.append(rows)
        return torch.tanh(a_part @ weight) + b_whole[:, : rows.stop].sum(dim=1, keepdim=True)

    return a, b, weight, fn, calls


def _plain(a, b, weight, fn, bounds, grad):
    out = torch.cat([fn(a[:, r], b, rows=r) for r in bounds], dim=1)
    return out, torch.autograd.grad(out, [a, b, weight], grad)


@pytest.mark.parametrize("predicted", [True, False])
def test_each_slice_runs_once_and_gives_plain_gradients(predicted):
    """With the predicted gradient, the slices run once (at recomputation) and the node hands over gradients equal
    to plain autograd's (float64, 1e-12; the same sums in another order). With another gradient, the node runs
    every slice again and back-propagates the one it received: still plain autograd's gradients."""
    a, b, weight, fn, calls = _problem()
    bounds = slice_bounds(10, 3)
    expected = torch.randn(2, 10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    received = expected if predicted else expected * 3
    out = backpropagate_slices(fn, [a], [b], 1, bounds, expected)
    assert len(calls) == len(bounds)
    grads = torch.autograd.grad(out, [a, b, weight], received.clone())
    assert len(calls) == len(bounds) * (1 if predicted else 2)
    plain_out, plain_grads = _plain(a, b, weight, fn, bounds, received)
    assert torch.equal(out, plain_out)
    for mine, theirs in zip(grads, plain_grads):
        assert relative_error(mine, theirs) <= 1e-12


def test_an_input_changed_in_place_before_the_backward_raises():
    """The sliced inputs are saved with their versions: a fallback never runs on changed inputs."""
    a, b, weight, fn, _ = _problem()
    bounds = slice_bounds(10, 4)
    expected = torch.ones(2, 10, 6, dtype=torch.float64)
    base = a.detach().clone().requires_grad_()
    x = base * 1.0
    out = backpropagate_slices(fn, [x], [b], 1, bounds, expected)
    with torch.no_grad():
        x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(expected * 2)


@pytest.mark.parametrize("setting", ["dropout", "autocast"])
def test_a_fallback_replays_the_slices_dropout_and_autocast(setting):
    """A fallback runs the slices again during the engine's backward, where neither the RNG state nor the
    autocast of the recomputation holds any more: it draws the same dropout masks and runs under the same
    autocast as the slices did, so its gradients are bit for bit those the slices gave when the gradient they
    received was the predicted one (dropout's other masks, or float32 instead of bfloat16, would differ)."""
    generator = torch.Generator().manual_seed(2)
    a = torch.randn(2, 10, 6, generator=generator, requires_grad=True)
    weight = torch.randn(6, 6, generator=generator, requires_grad=True)

    autocast_seen = []

    def fn(a_part, *, rows):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        h = a_part @ weight
        return torch.nn.functional.dropout(h, 0.5, training=True) if setting == "dropout" else torch.tanh(h)

    layout = slice_bounds(10, 4)
    dtype = torch.bfloat16 if setting == "autocast" else torch.float32  # the slices' output dtype
    received = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(3)).to(dtype)
    results = []
    for predicted in (received, received * 3):  # the second prediction is wrong: a fallback
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "autocast"):
            out = backpropagate_slices(fn, [a], [], 1, layout, predicted)
        torch.manual_seed(5)  # the engine's backward runs from another RNG state than the recomputation's
        results.append((out, torch.autograd.grad(out, [a, weight], received)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(grads_a, grads_b))
    assert len(autocast_seen) == 3 * len(layout) and all(on == (setting == "autocast") for on in autocast_seen)
