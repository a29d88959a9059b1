"""Bit planes packed eight to a byte.

A plane of integers in ``[0, 2**width)`` is stored as ``width`` one-bit planes, each packed
into ``ceil(n / 8)`` bytes: byte j of plane i holds bit i of elements 8j .. 8j+7, element 8j+t
in bit t.

Two ways compute these bytes, the same ones:

- eagerly on a little-endian machine, eight bytes at a time: the bytes 8j .. 8j+7 read as one int64 word w
  (byte t in bits 8t .. 8t+7), bit i of every byte is ``(w >> i) & 0x0101..01``, and three shift-ORs by 7, 14 and
  28 bring bits 0, 8, .., 56 together into bits 0 .. 7; unpacking looks each byte up in a table of 256 words
  that hold its 8 bits one per byte. A handful of operations on n/8 words: several times faster than the column
  merge and the bit tests, and fewer operations, each of which costs a fixed amount besides its work;
- otherwise (under torch.compile, or on a big-endian machine), on bytes: packing ORs pairs of columns, shifted by
  Python constants, in three rounds; unpacking tests each bit with AND against the bit weights.

No step shifts by a tensor or sums bytes: the earlier uint8 shift by a tensor of bit positions followed by a uint8
sum was reported miscompiled by torch.compile's CPU backend (docs/engines.md, "The plain path under inductor"), and
the stack's plain path, which torch.compile compiles, packs the signs of g with this module.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_SPREAD_TABLES: dict[torch.device, torch.Tensor] = {}
_LOW_BIT_OF_EACH_BYTE = 0x0101010101010101


def _weights(device: torch.device) -> torch.Tensor:
    """The bit weights 1, 2, 4, .., 128 as a uint8 tensor on ``device`` (cached)."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.tensor([1 << t for t in range(8)], dtype=torch.uint8, device=device)
    return _WEIGHTS[device]


def _spread_table(device: torch.device) -> torch.Tensor:
    """table[v] = the int64 word whose byte t is bit t of v, for v = 0 .. 255, on ``device`` (cached)."""
    if device not in _SPREAD_TABLES:
        words = [sum(((v >> t) & 1) << (8 * t) for t in range(8)) for v in range(256)]
        _SPREAD_TABLES[device] = torch.tensor(words, dtype=torch.int64, device=device)
    return _SPREAD_TABLES[device]


def _by_words() -> bool:
    """Whether to work on int64 words (eager, little-endian) rather than on bytes."""
    return sys.byteorder == "little" and not torch.compiler.is_compiling()


@dataclass(frozen=True)
class PackedBits:
    """``width`` bit planes of a tensor of shape ``shape``, packed into ``data`` (uint8)."""

    data: torch.Tensor
    shape: torch.Size
    width: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _pack_plane(bits: torch.Tensor) -> torch.Tensor:
    """byte[j] = OR_t bits[8j + t] << t for a flat uint8 plane of 0/1 whose length is a multiple of 8:
    neighbouring columns are merged three times, c' = c_even | c_odd << width, width 1, 2, 4."""
    columns = bits.view(-1, 8)
    for width in (1, 2, 4):
        columns = columns[:, 0::2] | (columns[:, 1::2] << width)
    return columns.view(-1)


def _pack_words(words: torch.Tensor, i: int) -> torch.Tensor:
    """Plane i of the bytes held in int64 ``words``: bit i of byte t of word j goes to bit t of byte j."""
    plane = (words >> i if i else words) & _LOW_BIT_OF_EACH_BYTE
    for shift in (7, 14, 28):
        plane |= plane >> shift
    return plane.to(torch.uint8)  # the low byte: int64 -> uint8 keeps v mod 256


def pack_bits(values: torch.Tensor, width: int = 1) -> PackedBits:
    """Pack integers in ``[0, 2**width)`` into ``width`` planes of 1 bit per element.

    byte[i, j] = OR_t ((v[8j + t] >> i) & 1) << t
    """
    if not 1 <= width <= 8:
        raise ValueError(f"pack_bits packs 1 to 8 bit planes, got width={width}")
    if values.dtype.is_floating_point or (values.dtype == torch.bool and width != 1):
        raise TypeError(f"pack_bits needs an integer or bool tensor, got {values.dtype}")
    flat = values.reshape(-1)
    if values.dtype == torch.bool and not torch.compiler.is_compiling():
        flat = flat.view(torch.uint8)  # a bool is stored as the byte 0 or 1 (inductor before 2.13 cannot view it)
    elif values.dtype != torch.uint8:
        flat = flat.to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if _by_words():
        if flat.storage_offset() % 8 or not flat.is_contiguous():  # a word view needs 8-byte steps from 0
            flat = flat.clone(memory_format=torch.contiguous_format)
        planes = [_pack_words(flat.view(torch.int64), i) for i in range(width)]
    else:
        planes = [_pack_plane((flat >> i) & 1 if i else flat & 1) for i in range(width)]
    return PackedBits(torch.stack(planes) if width > 1 else planes[0].unsqueeze(0), values.shape, width)


def _unpack_span(packed: PackedBits, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of the flattened values, reading only the bytes that hold them:
    v[8j + t] = OR_i [byte[i, j] & 2**t != 0] << i."""
    first_byte, end_byte = start // 8, (start + count + 7) // 8
    offset = start - 8 * first_byte
    if _by_words():  # each byte looked up as the word of its 8 bits, one per byte
        table = _spread_table(packed.data.device)
        words = table.index_select(0, packed.data[0, first_byte:end_byte].to(torch.int64))
        for i in range(1, packed.width):
            words |= table.index_select(0, packed.data[i, first_byte:end_byte].to(torch.int64)) << i
        return words.view(torch.uint8)[offset : offset + count].to(dtype)
    weights = _weights(packed.data.device)
    planes = [
        ((byte[first_byte:end_byte].unsqueeze(-1) & weights) != 0).reshape(-1)[offset : offset + count]
        for byte in packed.data
    ]
    if packed.width == 1:
        return planes[0].to(dtype)
    out = planes[0].to(torch.uint8)
    for i, plane in enumerate(planes[1:], start=1):
        out.bitwise_or_(plane.to(torch.uint8) << i)
    return out.to(dtype)


def unpack_bits(packed: PackedBits, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: v[8j + t] = OR_i [byte[i, j] & 2**t != 0] << i."""
    return _unpack_span(packed, 0, packed.shape.numel(), dtype).view(packed.shape)


def unpack_rows(packed: PackedBits, first: int, rows: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Rows ``first .. first + rows - 1`` of dim 0 of the packed values, equal to
    ``unpack_bits(packed, dtype)[first : first + rows]``, unpacking only the bytes that hold them."""
    row_numel = packed.shape[1:].numel()
    return _unpack_span(packed, first * row_numel, rows * row_numel, dtype).view(rows, *packed.shape[1:])


__all__ = ["PackedBits", "pack_bits", "unpack_bits", "unpack_rows"]
