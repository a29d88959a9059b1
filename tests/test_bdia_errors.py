"""Bad input gets an error that names its cause."""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs


class Scale(torch.nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Widen(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x, x], dim=-1)


class ToDouble(torch.nn.Module):
    def forward(self, x):
        return x.double()


def test_a_block_that_changes_shape_is_named():
    stack = revbits.BDIAStack([Scale(1.0), Widen(), Scale(1.0)])
    with pytest.raises(revbits.BlockProtocolError, match=r"block 1 \(Widen\) maps \(2, 4\)"):
        stack(torch.randn(2, 4, requires_grad=True))


def test_a_block_that_changes_dtype_is_named():
    stack = revbits.BDIAStack([Scale(1.0), Scale(1.0), ToDouble()])
    with pytest.raises(revbits.BlockProtocolError, match="block 2 .*torch.float64"):
        stack(torch.randn(2, 4, requires_grad=True))


def test_overflow_beyond_the_exact_range_names_the_block():
    # float32 with bits=9 is exact below 2**15; block 2 multiplies by 1e4
    stack = revbits.BDIAStack([Scale(1.0), Scale(1.0), Scale(1e4), Scale(1.0)])
    x = torch.full((2, 4), 10.0, requires_grad=True)
    with pytest.raises(revbits.StreamRangeError, match=r"output of block 2 .*2\*\*15"):
        stack(x, gammas=torch.ones(3, 2))
    stack.reversible = False
    with pytest.raises(revbits.StreamRangeError, match="output of block 2"):
        stack(x, gammas=torch.ones(3, 2))


def test_range_advice_offers_float64_only_below_float64():
    blocks = [Scale(1.0), Scale(1.0), Scale(1e4), Scale(1.0)]
    x = torch.full((2, 4), 10.0, requires_grad=True)
    with pytest.raises(revbits.StreamRangeError, match="or use float64"):
        revbits.BDIAStack(blocks)(x, gammas=torch.ones(3, 2))
    stack = revbits.BDIAStack([Scale(1.0), Scale(1.0), Scale(1e10), Scale(1.0)], bits=23).double()  # below 2**30
    with pytest.raises(revbits.StreamRangeError, match=r"float64; normalise the stream or lower `bits`$"):
        stack(x.double(), gammas=torch.ones(3, 2))


def test_float64_has_a_wider_exact_range():
    stack = revbits.BDIAStack([Scale(1.0), Scale(1.0), Scale(1e4)]).double()
    x = torch.full((2, 4), 10.0, dtype=torch.float64, requires_grad=True)
    stack(x, gammas=torch.ones(2, 2)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_nan_in_the_stream_is_reported_with_its_block():
    stack = revbits.BDIAStack([Scale(1.0), Scale(float("nan")), Scale(1.0)])
    with pytest.raises(revbits.StreamRangeError, match="output of block 1 .*NaN or Inf"):
        stack(torch.randn(2, 4, requires_grad=True), gammas=torch.ones(2, 2))


def test_nan_input_is_reported():
    stack = revbits.BDIAStack([Scale(1.0), Scale(1.0)])
    x = torch.randn(2, 4)
    x[0, 0] = float("inf")
    with pytest.raises(revbits.StreamRangeError, match="input of the stack"):
        stack(x.requires_grad_(), gammas=torch.ones(1, 2))


@pytest.mark.parametrize("gamma", [0.3, 1.0, 0.0, 2.0, 2**-9, -0.6])
def test_gamma_must_be_a_small_power_of_two(gamma):
    with pytest.raises(ValueError, match="gamma must be 2\\*\\*-b"):
        revbits.BDIAStack(gpt_blocks(2), gamma=gamma)


def test_negative_power_of_two_gamma_means_the_same_magnitude():
    assert revbits.BDIAStack(gpt_blocks(2), gamma=-0.25).gamma_bits == 2


@pytest.mark.parametrize("depth", [0, 1])
def test_fewer_than_two_blocks_is_refused(depth):
    with pytest.raises(ValueError, match="at least 2 blocks"):
        revbits.BDIAStack(gpt_blocks(depth))


def test_bad_bits_and_non_modules_are_refused():
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 23"):
        revbits.BDIAStack(gpt_blocks(2), bits=30)
    with pytest.raises(TypeError, match="block 1 is a function"):
        revbits.BDIAStack([torch.nn.Identity(), lambda x: x])


def test_explicit_gammas_are_checked():
    stack = revbits.BDIAStack(gpt_blocks(3))
    x = torch.randn(2, 4, 32)
    with pytest.raises(ValueError, match=r"shape \[K-1, batch\] = \[2, 2\]"):
        stack(x, gammas=torch.ones(3, 2))
    with pytest.raises(ValueError, match="signs, \\+1 or -1"):
        stack(x, gammas=torch.full((2, 2), 0.5))


def test_low_precision_stream_is_refused_with_advice():
    stack = revbits.BDIAStack(gpt_blocks(2)).bfloat16()
    with pytest.raises(TypeError, match="float32 or float64.*autocast") as error:
        stack(torch.randn(2, 4, 32, dtype=torch.bfloat16))
    # FSDP2's MixedPrecisionPolicy as usually written hits this error too: the fixes that work are named
    # (tests/test_engines_distributed.py runs them)
    assert "output_dtype=torch.float32" in str(error.value) and "cast_forward_inputs=False" in str(error.value)


def test_higher_order_gradients_are_refused_clearly():
    stack = revbits.BDIAStack(gpt_blocks(3)).double()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    out = stack(x, gammas=random_signs(3, 2)).sum()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out, x, create_graph=True)


def test_second_backward_through_the_same_forward_is_refused():
    stack = revbits.BDIAStack(gpt_blocks(3)).double()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    out = stack(x, gammas=random_signs(3, 2)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran"):
        out.backward()


def test_output_modified_in_place_is_detected():
    stack = revbits.BDIAStack(gpt_blocks(3)).double()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    out = stack(x, gammas=random_signs(3, 2))
    with torch.no_grad():
        out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_a_block_returning_a_tuple_is_named():
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x, x

    stack = revbits.BDIAStack([Scale(1.0), Pair()])
    with pytest.raises(revbits.BlockProtocolError, match="block 1 \\(Pair\\) returned tuple"):
        stack(torch.randn(2, 4, requires_grad=True))


def test_a_block_that_modifies_its_input_in_place_is_named():
    class AddInPlace(torch.nn.Module):
        def forward(self, x):
            x += 1.0
            return x

    stack = revbits.BDIAStack([Scale(1.0), AddInPlace(), Scale(1.0)])
    with pytest.raises(revbits.BlockProtocolError, match=r"block 1 \(AddInPlace\) modified its input in place"):
        stack(torch.randn(2, 4, requires_grad=True), gammas=torch.ones(2, 2))


def test_a_nested_tensor_that_needs_a_gradient_is_refused():
    class UsesPair(torch.nn.Module):
        def forward(self, x, pair):
            return x + pair[0]

    memory = torch.randn(2, 4, requires_grad=True)
    stack = revbits.BDIAStack([UsesPair(), UsesPair()])
    with pytest.raises(revbits.BlockProtocolError, match="argument 0 is a tuple holding a tensor that requires grad"):
        stack(torch.randn(2, 4, requires_grad=True), (memory,), gammas=torch.ones(1, 2))


def test_non_contiguous_input_with_large_values_gives_no_false_alarm():
    torch.manual_seed(0)

    class Tanh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 64)

        def forward(self, x):
            return x + 0.01 * torch.tanh(self.linear(x))

    stack = revbits.BDIAStack([Tanh() for _ in range(4)])
    for _ in range(5):
        x = (torch.rand(64, 8, 33) * 30 + 100).transpose(0, 2).requires_grad_()  # a strided layout
        stack(x).sum().backward()  # a false alarm would raise ReversibilityError
