"""InfoBuffer: pushes undone exactly by pops, multiplications by n / 2**F undone by divisions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from revbits.revrnn.info_buffer import InfoBuffer

SHAPE = (3, 5)


@st.composite
def push_sequences(draw):
    """Pushes of random remainders in random bases (up to 2**20), some rows masked."""
    steps = draw(st.integers(1, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    calls = []
    for _ in range(steps):
        bits = draw(st.integers(0, 20))
        base = torch.randint(1, 2**bits + 1, SHAPE, generator=generator)
        remainder = (torch.rand(SHAPE, generator=generator, dtype=torch.float64) * base).long().clamp_max(base - 1)
        active = torch.rand(SHAPE[0], generator=generator) < 0.8
        calls.append((remainder, base, active))
    return calls


@settings(max_examples=60, deadline=None)
@given(push_sequences(), st.integers(1, 8), st.booleans())
def test_any_sequence_of_pushes_is_undone_exactly_by_the_pops(calls, check_every, host_decides):
    buffer = InfoBuffer(SHAPE, max_bits_per_step=20, check_every=check_every, host_decides=host_decides)
    for remainder, base, active in calls:
        buffer.push(remainder, base, active)
    for remainder, base, active in reversed(calls):
        popped = buffer.pop(base, active)
        rows = active.nonzero().flatten()
        assert torch.equal(popped[rows], remainder[rows])
    assert buffer.empty


@pytest.mark.parametrize("host_decides", [True, False])
def test_long_sequences_spill_and_the_stack_grows(host_decides):
    buffer = InfoBuffer(SHAPE, max_bits_per_step=20, check_every=4, host_decides=host_decides)
    generator = torch.Generator().manual_seed(0)
    values = [torch.randint(0, 2**20, SHAPE, generator=generator) for _ in range(200)]  # 4000 bits per unit
    for v in values:
        buffer.push(v, 2**20)
    assert int(buffer.depth) >= 4000 // 63
    assert buffer.stored_bits() >= 4000 * 15
    for v in reversed(values):
        assert torch.equal(buffer.pop(2**20), v)
    assert buffer.empty


@st.composite
def gated_steps(draw):
    fraction_bits = draw(st.sampled_from([10, 8]))
    forget_bits = draw(st.sampled_from([1, 2, 3, 5, None]))
    steps = draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**31 - 1))
    return fraction_bits, forget_bits, steps, seed, draw(st.booleans())


@settings(max_examples=60, deadline=None)
@given(gated_steps())
def test_multiply_then_divide_restores_state_and_buffer_bit_for_bit(case):
    fraction_bits, forget_bits, steps, seed, host_decides = case
    generator = torch.Generator().manual_seed(seed)
    lowest = 1 if forget_bits is None else 2 ** (fraction_bits - forget_bits)
    h = torch.randint(-(2**31), 2**31, SHAPE, generator=generator)
    buffer = InfoBuffer(
        SHAPE, fraction_bits=fraction_bits, max_bits_per_step=forget_bits, check_every=5, host_decides=host_decides
    )
    history = []
    for _ in range(steps):
        n = torch.randint(lowest, 2**fraction_bits + 1, SHAPE, generator=generator)
        update = torch.randint(-(2**20), 2**20, SHAPE, generator=generator)
        active = torch.rand(SHAPE[0], generator=generator) < 0.7
        history.append((h, n, update, active))
        h = buffer.multiply(h, n, active) + torch.where(active[:, None], update, 0)
    for h_before, n, update, active in reversed(history):
        h = buffer.divide(h - torch.where(active[:, None], update, 0), n, active)
        assert torch.equal(h, h_before)
    assert buffer.empty


def test_multiplication_stores_only_what_it_loses():
    """With z = 1/2 everywhere, one bit per unit per step is kept, in 64-bit words."""
    buffer = InfoBuffer(SHAPE, fraction_bits=10, max_bits_per_step=1, check_every=16, track_information=True)
    h = torch.randint(-(2**30), 2**30, SHAPE)
    half = torch.full(SHAPE, 512)
    for _ in range(500):
        h = buffer.multiply(h, half) + 2**29  # keep h away from zero so every step loses its bit
    used = int(buffer.depth) + 1
    assert used <= 500 // 53 + 2  # about 53 bits per spilled word
    assert buffer.lost_bits.item() == 500 * 15  # one bit per unit and step destroyed


def test_host_and_device_decisions_spill_the_same_words():
    """Reading the spill decision on the host (the CPU default) stores what the device-side stack stores."""
    generator = torch.Generator().manual_seed(7)
    buffers = [InfoBuffer(SHAPE, max_bits_per_step=3, check_every=4, host_decides=host) for host in (True, False)]
    h = [torch.randint(-(2**31), 2**31, SHAPE, generator=generator)] * 2
    for _ in range(400):
        n = torch.randint(128, 1025, SHAPE, generator=generator)
        active = torch.rand(SHAPE[0], generator=generator) < 0.8
        h = [buffer.multiply(value, n, active) for buffer, value in zip(buffers, h)]
        assert torch.equal(h[0], h[1]) and torch.equal(buffers[0].word, buffers[1].word)
    assert int(buffers[0].depth) == int(buffers[1].depth) > 0
    assert buffers[0].stored_bits() == buffers[1].stored_bits()


def test_more_pops_than_pushes_is_an_error():
    buffer = InfoBuffer(SHAPE)
    with pytest.raises(RuntimeError, match="more pops than pushes"):
        buffer.pop(2)


def test_bad_fraction_bits_is_named():
    with pytest.raises(ValueError, match="fraction_bits"):
        InfoBuffer(SHAPE, fraction_bits=0)
