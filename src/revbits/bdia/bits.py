"""Bit planes packed eight to a byte.

A plane of integers in ``[0, 2**width)`` is stored as ``width`` one-bit planes, each packed
into ``ceil(n / 8)`` bytes: byte j of plane i holds bit i of elements 8j .. 8j+7, element 8j+t
in bit t.

No step shifts by a tensor or sums bytes: packing ORs pairs of columns, shifted by Python
constants, in three rounds; unpacking tests each bit with AND against the bit weights. The
earlier uint8 shift by a tensor of bit positions followed by a uint8 sum was reported
miscompiled by torch.compile's CPU backend (docs/engines.md, "The plain path under inductor"),
and the stack's plain path, which torch.compile compiles, packs the signs of g with this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    """The bit weights 1, 2, 4, .., 128 as a uint8 tensor on ``device`` (cached)."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.tensor([1 << t for t in range(8)], dtype=torch.uint8, device=device)
    return _WEIGHTS[device]


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


def pack_bits(values: torch.Tensor, width: int = 1) -> PackedBits:
    """Pack integers in ``[0, 2**width)`` into ``width`` planes of 1 bit per element.

    byte[i, j] = OR_t ((v[8j + t] >> i) & 1) << t
    """
    if not 1 <= width <= 8:
        raise ValueError(f"pack_bits packs 1 to 8 bit planes, got width={width}")
    if values.dtype.is_floating_point or (values.dtype == torch.bool and width != 1):
        raise TypeError(f"pack_bits needs an integer or bool tensor, got {values.dtype}")
    flat = values.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.to(torch.uint8) if values.dtype != torch.uint8 else flat
    planes = [_pack_plane((flat >> i) & 1 if i else flat & 1) for i in range(width)]
    return PackedBits(torch.stack(planes), values.shape, width)


def _unpack_span(packed: PackedBits, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of the flattened values, reading only the bytes that hold them:
    v[8j + t] = OR_i [byte[i, j] & 2**t != 0] << i."""
    first_byte, end_byte = start // 8, (start + count + 7) // 8
    offset = start - 8 * first_byte
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
