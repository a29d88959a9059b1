"""The native BDIA step (revbits/native/bdia_step.cpp) against the Python path: every bit the same.

Each fused operator is compared with the chain of PyTorch operators it replaces, on grid states up to the
grid's range limit, zeros of both signs, block outputs far off the grid and gradients down to subnormals,
for float32 and float64 and sizes that are no multiple of 8 or 16; then whole BDIA training steps with the
kernel on and off (REVBITS_NATIVE). Bits are compared as integers, so -0.0 and +0.0 differ. CI has a C++
compiler: where the kernel cannot be built these tests fail, they do not skip.
"""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs, run_step
from revbits import native
from revbits.bdia import native_step
from revbits.bdia.fixedpoint import exact_limit
from revbits.bdia.gradients import skip_gradient
from revbits.bdia.step import Step

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 1), (3, 5), (2, 7, 13), (5, 3, 17), (4, 33, 9)]  # sizes 1, 15, 182, 255, 1188
GAMMAS = [0.5, 0.25, 2**-7, 2**-8]  # b = 1, 2, 7 (int8 bytes), 8 (uint8 bytes)
_INTS = {torch.float32: torch.int32, torch.float64: torch.int64}


@pytest.fixture
def kernel(monkeypatch):
    """The kernel built and on: a build failure fails the test (native.build raises)."""
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    native.build("bdia_step")
    assert native_step.available(), "the native BDIA kernel did not load"


def python_path(monkeypatch, on: bool) -> None:
    monkeypatch.setenv(native.ENV_SWITCH, "1" if on else "0")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bit patterns (so -0.0 != +0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype in _INTS:
        return torch.equal(a.contiguous().view(_INTS[a.dtype]), b.contiguous().view(_INTS[b.dtype]))
    return torch.equal(a, b)


def grid_states(shape, dtype, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Grid values 2**-bits m: ordinary ones, ones within a few steps of the range limit, and zeros of both signs."""
    limit_codes = int(exact_limit(dtype, bits) * 2**bits)
    n = torch.Size(shape).numel()
    codes = torch.randint(-(2**14), 2**14, (n,), generator=generator, dtype=torch.int64)
    near = torch.randint(1, 40, (n,), generator=generator, dtype=torch.int64)
    pick = torch.randint(0, 4, (n,), generator=generator)
    codes = torch.where(pick == 1, limit_codes - near, torch.where(pick == 2, near - limit_codes, codes))
    x = codes.to(dtype) * 2.0**-bits
    zeros = torch.randint(0, 6, (n,), generator=generator)
    x = torch.where(zeros == 0, torch.zeros((), dtype=dtype), x)
    x = torch.where(zeros == 1, torch.full((), -0.0, dtype=dtype), x)
    return x.view(shape)


def block_outputs(shape, dtype, bits: int, generator: torch.Generator) -> torch.Tensor:
    """Off-grid values: normal ones, exact halves of a grid step (ties of the rounding), large ones."""
    y = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) * 3
    pick = torch.randint(0, 5, shape, generator=generator)
    ties = (torch.randint(-999, 999, shape, generator=generator).to(dtype) + 0.5) * 2.0**-bits
    large = exact_limit(dtype, bits) * (torch.rand(shape, generator=generator, dtype=dtype) - 0.5) / 2
    return torch.where(pick == 1, ties, torch.where(pick == 2, large, y))


def signs_of(shape, dtype, gamma: float, generator: torch.Generator) -> torch.Tensor:
    """g = +-gamma per sample, shaped [B, 1, .., 1]."""
    signs = torch.randint(0, 2, (shape[0],), generator=generator).to(dtype) * 2 - 1
    return (signs * gamma).view(-1, *([1] * (len(shape) - 1)))


def every_step_case(test):
    """Runs ``test`` without a graph for every dtype, shape and |g| (its arguments dtype, shape, gamma)."""
    for name, values in (("gamma", GAMMAS), ("shape", SHAPES), ("dtype", DTYPES)):
        test = pytest.mark.parametrize(name, values)(test)
    return torch.no_grad()(test)


def step_inputs(shape, dtype, gamma, bits=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x_prev, x_cur = grid_states(shape, dtype, bits, generator), grid_states(shape, dtype, bits, generator)
    return x_prev, x_cur, block_outputs(shape, dtype, bits, generator), signs_of(shape, dtype, gamma, generator)


@every_step_case
def test_forward_step_and_bit_planes_are_the_python_paths(kernel, monkeypatch, dtype, shape, gamma):
    step = Step(9, gamma)
    x_prev, x_cur, y, g = step_inputs(shape, dtype, gamma)
    python_path(monkeypatch, False)
    expected, expected_bits = step.forward(x_prev, x_cur, y, g)
    python_path(monkeypatch, True)
    fused = native_step.forward_step(x_prev, x_cur, y, g, step.bits, step.gamma_bits, True, None)
    assert fused is not None, "the native kernel did not run"
    assert same_bits(fused[0], expected)
    assert torch.equal(fused[1], expected_bits.data)
    x_next, kept = step.forward(x_prev, x_cur, y, g)
    assert same_bits(x_next, expected) and torch.equal(kept.data, expected_bits.data)
    assert (kept.shape, kept.width) == (expected_bits.shape, expected_bits.width)
    in_place = x_prev.clone()  # the chunked forward writes x_{k+1} over x_{k-1}
    x_next, _ = step.forward(in_place, x_cur, y, g, out=in_place)
    assert x_next is in_place and same_bits(in_place, expected)
    assert step.forward(x_prev, x_cur, y, g, keep=False)[1] is None


@every_step_case
def test_inverse_step_is_the_python_paths(kernel, monkeypatch, dtype, shape, gamma):
    step = Step(9, gamma)
    x_prev, x_cur, y, g = step_inputs(shape, dtype, gamma, seed=1)
    python_path(monkeypatch, False)
    x_next, kept = step.forward(x_prev, x_cur, y, g)
    expected = step.inverse(x_next, x_cur, y, g, kept)  # x_prev where x_next is in range (states near the limit
    # and large block outputs take it out, which the forward reports; the two paths agree anyway)
    python_path(monkeypatch, True)
    fused = native_step.inverse_step(x_next, x_cur, y, g, kept.data, step.bits, None)
    assert fused is not None, "the native kernel did not run"
    assert same_bits(fused, expected)
    in_place = x_next.clone()  # the chunked backward writes x_{k-1} over x_{k+1}
    assert step.inverse(in_place, x_cur, y, g, kept, out=in_place) is in_place
    assert same_bits(in_place, expected)


def gradients(shape, dtype, generator):
    """Gradients over many magnitudes, subnormals and zeros of both signs among them."""
    tiny = torch.finfo(dtype).tiny
    values = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    scale = torch.randint(-60, 60, shape, generator=generator).to(dtype).exp2()
    pick = torch.randint(0, 6, shape, generator=generator)
    values = torch.where(pick == 0, values * tiny * 3, values * scale)
    return torch.where(pick == 1, torch.full((), -0.0, dtype=dtype), values)


@pytest.mark.parametrize("top", [True, False])
@pytest.mark.parametrize("gamma", [0.5, 2**-8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_step_gradients_are_the_python_paths(kernel, dtype, shape, gamma, top):
    generator = torch.Generator().manual_seed(2)
    dx1, dx2 = gradients(shape, dtype, generator), gradients(shape, dtype, generator)
    g, g1 = signs_of(shape, dtype, gamma, generator), signs_of(shape, dtype, gamma, generator)
    dx2, g1 = (None, None) if top else (dx2, g1)  # block K-1 has no dL/dx_{k+2}
    expected_grad_y = (1 + g) * dx1
    expected = torch.empty_like(dx1)
    skip_gradient(expected, dx2, g1, dx1, g)
    out = torch.empty_like(dx1) if top else dx2.clone()  # the backward writes over dL/dx_{k+2}
    assert native_step.addcmul_rounds_once(dtype) is not None, "no way of rounding matched ATen's addcmul"
    grad_y = native_step.step_gradients(out, None if top else out, g1, dx1, g)
    assert grad_y is not None, "the native kernel did not run"
    assert same_bits(grad_y, expected_grad_y) and same_bits(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_threads_split_the_work_without_changing_a_bit(kernel, monkeypatch, dtype):
    """Several threads, each on a range of bytes, over samples that straddle their bytes (70 000 elements)."""
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    step, shape = Step(9, 0.25), (7, 100, 100)
    x_prev, x_cur, y, g = step_inputs(shape, dtype, 0.25, seed=3)
    python_path(monkeypatch, False)
    expected, expected_bits = step.forward(x_prev, x_cur, y, g)
    rebuilt_expected = step.inverse(expected, x_cur, y, g, expected_bits)
    python_path(monkeypatch, True)
    x_next, kept = step.forward(x_prev, x_cur, y, g)
    assert same_bits(x_next, expected) and torch.equal(kept.data, expected_bits.data)
    assert same_bits(step.inverse(x_next, x_cur, y, g, kept), rebuilt_expected)


@torch.no_grad()
def test_one_g_for_all_samples_and_other_tensors_take_the_python_path(kernel, monkeypatch):
    step = Step(9, 0.5)
    x_prev, x_cur, y, _ = step_inputs((3, 4, 5), torch.float32, 0.5, seed=4)
    g = torch.tensor(-0.5)
    python_path(monkeypatch, False)
    expected, bits = step.forward(x_prev, x_cur, y, g)
    python_path(monkeypatch, True)
    assert native_step.forward_step(x_prev, x_cur, y, g, 9, 1, True, None) is not None
    x_next, kept = step.forward(x_prev, x_cur, y, g)
    assert same_bits(x_next, expected) and torch.equal(kept.data, bits.data)
    g_last = torch.full((5,), 0.5)  # a [B]-shaped g would broadcast along the last dim: not the kernel's layout
    assert native_step.forward_step(x_prev, x_cur, y, g_last, 9, 1, True, None) is None
    strided = y.transpose(1, 2).contiguous().transpose(1, 2)
    assert native_step.forward_step(x_prev, x_cur, strided, g, 9, 1, True, None) is None
    assert native_step.forward_step(x_prev, x_cur, y.to(torch.float16).float(), g.double(), 9, 1, True, None) is None
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert native_step.forward_step(x_prev, x_cur, y, g, 9, 1, True, None) is None


def spy(function, name: str, ran: list[str]):
    """``function``, noting ``name`` in ``ran`` each time the kernel ran (a result that is not None)."""

    def noted(*args, **kwargs):
        result = function(*args, **kwargs)
        if result is not None:
            ran.append(name)
        return result

    return noted


def training_step(monkeypatch, on: bool, dtype, chunks, gamma):
    python_path(monkeypatch, on)
    torch.manual_seed(0)
    depth, batch = 5, 5
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1), gamma=gamma, batch_chunks=chunks).to(dtype)
    x = torch.randn(batch, 6, 32, dtype=dtype, requires_grad=True)
    return run_step(stack, x, signs=random_signs(depth, batch, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bdia_training_step_is_the_same_with_the_kernel_on_and_off(kernel, monkeypatch, dtype, chunks):
    gamma = 0.25 if chunks == 2 else 0.5
    ran = []
    for name in ("forward_step", "inverse_step", "step_gradients"):
        monkeypatch.setattr(native_step, name, spy(getattr(native_step, name), name, ran))
    out_on, grads_on = training_step(monkeypatch, True, dtype, chunks, gamma)
    assert set(ran) == {"forward_step", "inverse_step", "step_gradients"}, "the kernel did not run"
    out_off, grads_off = training_step(monkeypatch, False, dtype, chunks, gamma)
    assert same_bits(out_on, out_off)
    assert grads_on.keys() == grads_off.keys()
    assert all(same_bits(grads_on[name], grads_off[name]) for name in grads_off)


def test_the_rounding_probe_runs_outside_operator_counts(kernel, monkeypatch):
    """The probe of ATen's addcmul runs once per dtype, unseen by revbits.measure's dispatch modes."""
    from revbits.measure import OperatorCount

    monkeypatch.setattr(native_step, "_ADDCMUL_FUSED", {})
    with OperatorCount() as counter:
        found = native_step.addcmul_rounds_once(torch.float32)
    assert found is not None and counter.count == 0
    assert native_step._ADDCMUL_FUSED == {torch.float32: found}
