"""Bit planes: packing is lossless and takes width/8 bytes per element."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from revbits.bdia import bits
from revbits.bdia.bits import pack_bits, unpack_bits, unpack_rows


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 13), min_size=1, max_size=3),
    width=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_unpack_inverts_pack(shape, width, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**width, shape, generator=generator, dtype=torch.int32)
    packed = pack_bits(values, width)
    assert packed.data.dtype == torch.uint8
    numel = values.numel()
    assert packed.nbytes == width * -(-numel // 8)
    assert torch.equal(unpack_bits(packed, torch.int32), values)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), row_numel=st.integers(1, 13), width=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_unpack_rows_is_the_rows_of_unpack_bits(rows, row_numel, width, seed):
    """Row r of a packed [R, n] starts at bit r n, rarely at a byte boundary: every row and run of rows is exact."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**width, (rows, row_numel), generator=generator, dtype=torch.int32)
    packed = pack_bits(values, width)
    for first in range(rows):
        for count in (1, rows - first):
            assert torch.equal(unpack_rows(packed, first, count, torch.int32), values[first : first + count])


def test_bit_order_is_little_endian_within_a_byte():
    packed = pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]))
    assert packed.data.tolist() == [[0b10000001, 0b00000001]]


def test_bool_input_packs_one_plane():
    flags = torch.tensor([True, False, True])
    assert torch.equal(unpack_bits(pack_bits(flags), torch.bool), flags)


def test_bad_width_and_dtype_are_refused():
    with pytest.raises(ValueError, match="1 to 8 bit planes"):
        pack_bits(torch.zeros(3, dtype=torch.int32), 9)
    with pytest.raises(TypeError, match="integer or bool"):
        pack_bits(torch.zeros(3))


def test_pack_and_unpack_compile_to_the_eager_bits():
    """Inductor (torch.compile on CPU) was reported to miscompile the former uint8 shift-and-sum on the signs of g
    (docs/engines.md): the compiled functions give eager's bytes, for signs [K-1, B] and for multi-plane residues."""
    torch._dynamo.reset()

    def round_trip(values: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_bits(values, width)
        return packed.data, unpack_bits(packed, torch.int8)

    compiled = torch.compile(round_trip, backend="inductor", dynamic=False)
    generator = torch.Generator().manual_seed(3)
    signs = (torch.randint(0, 2, (2, 8), generator=generator) * 2 - 1).to(torch.int8)
    cases = [(signs > 0, 1), (torch.randint(0, 4, (3, 13), generator=generator, dtype=torch.int32), 2)]
    try:
        for values, width in cases:
            want, got = round_trip(values, width), compiled(values, width)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            assert torch.equal(want[1], values.to(torch.int8))
    finally:
        torch._dynamo.reset()


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(0, 70), start=st.integers(0, 9), width=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_words_and_bytes_give_the_same_bits(numel, start, width, seed):
    """The eager path packs and unpacks on int64 words, torch.compile's on bytes: the same bytes and values, also for
    values that are a view starting at any byte (not a word boundary)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 2**width, (start + numel,), generator=generator, dtype=torch.uint8)[start:]
    by_words = pack_bits(values, width)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bits, "_by_words", lambda: False)
        by_bytes = pack_bits(values, width)
        unpacked_by_bytes = unpack_rows(by_bytes, 0, numel, torch.int32) if numel else None
    assert torch.equal(by_words.data, by_bytes.data)
    if numel:
        assert torch.equal(unpack_rows(by_words, 0, numel, torch.int32), unpacked_by_bytes)
        assert torch.equal(unpacked_by_bytes, values.to(torch.int32))
