"""The grid quantiser and its exact range."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from revbits.bdia.fixedpoint import exact_limit, grid_codes, quantize
from revbits.bdia.step import Step, forward_step, forward_step_, inverse_step_, residue


def test_quantiser_rounds_to_the_grid_with_halves_to_even():
    bits = 2
    y = torch.tensor([0.125, 0.375, -0.125, 0.3, 1.0])  # 0.125 = half a step of 0.25
    assert quantize(y, bits).tolist() == [0.0, 0.5, -0.0, 0.25, 1.0]


def test_quantiser_gradient_is_straight_through():
    y = torch.randn(5, requires_grad=True)
    (quantize(y, 9) * torch.arange(5.0)).sum().backward()
    assert torch.equal(y.grad, torch.arange(5.0))


def test_exact_limits_follow_the_significand():
    assert exact_limit(torch.float32, 9) == 2.0**15
    assert exact_limit(torch.float64, 9) == 2.0**44
    with pytest.raises(TypeError, match="float32 or float64"):
        exact_limit(torch.float16, 9)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 12),
    gamma_bits=st.integers(1, 4),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-4, 1.0),
)
def test_one_step_is_exactly_invertible(bits, gamma_bits, sign, seed, scale):
    """x_{k+1} = g (x_{k-1} + r 2**-l) + u, then x_{k-1} back from x_{k+1} and u, bit for bit."""
    magnitude = scale * exact_limit(torch.float32, bits) / 16  # 6 sigma stays inside the range
    generator = torch.Generator().manual_seed(seed)
    x_prev = quantize(torch.randn(64, generator=generator, dtype=torch.float32) * magnitude, bits)
    u = quantize(torch.randn(64, generator=generator) * magnitude, bits)
    g = torch.full((64,), sign * 2.0**-gamma_bits)
    r = residue(x_prev, bits, gamma_bits)
    assert torch.equal(r, r.round()) and int(r.min()) >= 0 and int(r.max()) < 2**gamma_bits
    codes = grid_codes(x_prev, bits)
    assert torch.equal((codes + r.to(codes.dtype)) % 2**gamma_bits, torch.zeros_like(codes))
    x_next = forward_step(x_prev, r, u, g, bits)
    assert torch.equal(x_next, quantize(x_next, bits)), "the new state is on the grid"
    assert torch.equal(forward_step_(x_prev, r.clone(), u.clone(), g, bits), x_next), "in place is identical"
    assert torch.equal(inverse_step_(x_next, r, u.clone(), g, bits), x_prev)


@pytest.mark.parametrize("gamma", [0.5, 0.25, 2.0**-8])
def test_the_step_of_bdia_and_petra_inverts_bit_for_bit_with_and_without_grad(gamma):
    """Step.forward then Step.inverse rebuild x_{k-1} exactly from the kept residue bits; the differentiable
    forward (grad on: the plain path and PETRA's recompute) and the in-place one (grad off) agree bitwise."""
    bits, generator = 9, torch.Generator().manual_seed(11)
    x_prev, x_cur, y = (quantize(torch.randn(4, 6, 8, generator=generator) * 30, bits) for _ in range(3))
    y = y + torch.randn(4, 6, 8, generator=generator) * 1e-3  # a block output is not on the grid
    g = (torch.randint(0, 2, (4, 1, 1), generator=generator) * 2 - 1) * gamma
    step = Step(bits, gamma)
    with torch.no_grad():
        x_next, kept = step.forward(x_prev, x_cur, y, g)
    assert kept is not None and kept.width == step.gamma_bits == round(-math.log2(gamma))
    leaf = x_prev.clone().requires_grad_()
    differentiable, none = step.forward(leaf, x_cur, y, g, keep=False)
    assert none is None and differentiable.requires_grad and torch.equal(differentiable, x_next)
    assert torch.equal(step.inverse(x_next, x_cur, y, g, kept), x_prev)
    differentiable.sum().backward()
    assert torch.equal(leaf.grad, g.expand_as(leaf))  # the skip path's gradient is g (r is a constant)
    with pytest.raises(ValueError, match="gamma must be 2\\*\\*-b"):
        Step(bits, 0.3)


def test_grid_codes_are_the_integers_of_the_grid():
    x = torch.tensor([0.5, -0.25, 3.0])
    assert grid_codes(x, 2).tolist() == [2, -1, 12]


@pytest.mark.parametrize(
    "old",
    [
        "revbits.fixedpoint",
        "revbits.bits",
        "revbits.bdia_ops",
        "revbits.bdia_params",
        "revbits.bdia_args",
        "revbits.bdia_compile",
        "revbits.bdia_chunks",
        "revbits.info_buffer",
        "revbits.memory",
        "revbits.petra.vit",
        "revbits.train.hf_task",
        "revbits.train.task_base",
        "revbits.train.schedule",
    ],
)
def test_the_0_1_module_paths_are_gone(old):
    """0.3 removed the aliases 0.2 kept for the 0.1 paths (CHANGELOG lists each with its new path)."""
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(old)
